"""Backbones and the SimCLR loss; every registered method is tested in test_method_interface.py."""

import pytest
import torch
import torchvision
from lightly.loss import NTXentLoss
from torch.nn import functional as F

from histossl.config import BackboneConfig
from histossl.errors import ConfigError, HistosslError
from histossl.methods import METHODS
from histossl.methods.simclr import positive_is_nearest
from histossl.models.backbones import BACKBONES, Encoder, build_encoder, imagenet_weights_path, load_weights_file, save_encoder


def test_method_registry_refuses_unknown_and_duplicates():
    with pytest.raises(ConfigError, match="registered: barlow_twins, byol, dino, moco_v2, moco_v3, rotnet, rotnet_jitter, simclr, simsiam, vicreg"):
        METHODS.get("byol_typo")
    with pytest.raises(ValueError, match="twice"):
        METHODS.register("simclr")(object)


def naive_ntxent(z0: torch.Tensor, z1: torch.Tensor, temperature: float) -> torch.Tensor:
    """NT-Xent written out loop by loop (Chen et al. 2020, eq. 1), for checking lightly's."""
    z = F.normalize(torch.cat([z0, z1]), dim=1)
    n = z.shape[0]
    batch = z0.shape[0]
    total = 0.0
    for i in range(n):
        j = (i + batch) % n
        numerator = torch.exp(z[i] @ z[j] / temperature)
        denominator = sum(torch.exp(z[i] @ z[k] / temperature) for k in range(n) if k != i)
        total = total - torch.log(numerator / denominator)
    return total / n


@pytest.mark.parametrize("temperature", [0.1, 0.5])
def test_ntxent_matches_naive_reference(temperature):
    g = torch.Generator().manual_seed(3)
    z0, z1 = torch.randn(6, 8, generator=g), torch.randn(6, 8, generator=g)
    expected = naive_ntxent(z0, z1, temperature)
    assert torch.allclose(NTXentLoss(temperature=temperature)(z0, z1), expected, atol=1e-5)


def test_positive_is_nearest():
    z = torch.eye(4)
    assert positive_is_nearest(z, z + 0.01).item() == 1.0
    assert positive_is_nearest(z, torch.roll(z, 1, 0)).item() == 0.0


@pytest.mark.parametrize("name", ["resnet18", "resnet34", "resnet50"])
def test_encoder_contract_and_reload_into_torchvision(name, tmp_path):
    encoder = Encoder(name)
    feats = encoder(torch.rand(2, 3, 32, 32))
    assert feats.shape == (2, encoder.num_features)
    path = tmp_path / "encoder.safetensors"
    save_encoder(encoder, path)
    from safetensors.torch import load_file

    plain = torchvision.models.get_model(name, weights=None)
    missing, unexpected = plain.load_state_dict(load_file(str(path)), strict=False)
    assert sorted(missing) == ["fc.bias", "fc.weight"] and unexpected == []
    assert torch.equal(plain.conv1.weight, encoder.net.conv1.weight)


def test_small_stem_keeps_resolution():
    small, standard = Encoder("resnet18", "small"), Encoder("resnet18")
    assert small.net.conv1.stride == (1, 1) and isinstance(small.net.maxpool, torch.nn.Identity)
    assert small(torch.rand(2, 3, 32, 32)).shape == standard(torch.rand(2, 3, 32, 32)).shape


def test_backbone_registry_lists_names():
    with pytest.raises(ConfigError, match="resnet18"):
        Encoder("resnet_typo")
    assert {"resnet18", "resnet34", "resnet50"} <= set(BACKBONES.names())


def test_imagenet_init_offline_from_hub_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setenv("HISTOSSL_OFFLINE", "1")
    path = imagenet_weights_path("resnet18")
    assert str(path).startswith(str(tmp_path))
    with pytest.raises(HistosslError, match=str(path)):
        build_encoder(BackboneConfig("resnet18"), "imagenet")
    reference = torchvision.models.resnet18()
    path.parent.mkdir(parents=True)
    torch.save(reference.state_dict(), path)
    encoder = build_encoder(BackboneConfig("resnet18"), "imagenet")
    assert torch.equal(encoder.net.layer4[1].conv2.weight, reference.layer4[1].conv2.weight)


def test_weights_file_shape_mismatch_names_the_key(tmp_path):
    state = torchvision.models.resnet18().state_dict()
    state["layer1.0.conv1.weight"] = torch.zeros(3, 3, 3, 3)
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    with pytest.raises(HistosslError, match="layer1.0.conv1.weight"):
        build_encoder(BackboneConfig("resnet18"), str(path))


class _Evil:
    def __reduce__(self):
        import os

        return (os.system, ("touch PWNED_MARKER",))


def test_pickle_with_code_is_refused_and_never_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pth"
    torch.save({"conv1.weight": _Evil()}, path)
    with pytest.raises(HistosslError, match="evil.pth"):
        load_weights_file(path)
    assert not (tmp_path / "PWNED_MARKER").exists()
