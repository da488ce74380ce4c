"""Every registered method through the method interface (a new method gets these for free): one step
changes the weights, the loss falls, teachers follow their students, a killed run resumes bit-identically,
the exported encoder loads into torchvision. Tiny: 16 px images, resnet18, batch 8, small heads."""

from __future__ import annotations

import dataclasses
import math

import pytest
import pytorch_lightning as pl
import torch
import torchvision
from safetensors.torch import load_file

from histossl import config
from histossl.config import EncoderConfig, TrainerConfig
from histossl.errors import ConfigError
from histossl.methods import METHODS, Method, method_settings, settings_key
from histossl.models.backbones import Encoder, save_encoder
from histossl.train.common import ArrayBatches, checkpoint_callbacks, loader, make_trainer, parameter_groups
from histossl.train.pretrain import PretrainModule

SIZE, BATCH = 16, 8


def tiny_settings(name: str, **extra) -> list[str]:
    """``--set`` overrides that shrink ``name``'s heads, queue and crops to test size."""
    fields = {f.name for f in dataclasses.fields(METHODS.config(name))}
    small = {f: 32 for f in fields if f.endswith("_dim")} | {"queue_size": 16, "local_crops": 2}
    return [f"encoders.e.settings.{k}={v}" for k, v in (small | extra).items() if k in fields]


def build(name: str, overrides: list[str] = ()):
    cfg = config.load(None, [f"image_size={SIZE}", f"pretrain.batch_size={BATCH}", f"encoders.e.method={name}", *tiny_settings(name), *overrides])
    entry = cfg.encoders["e"]
    return METHODS.get(name)(Encoder("resnet18"), method_settings(cfg, entry), cfg.pretrain, SIZE), cfg


def fixed_batch(n: int = BATCH) -> torch.Tensor:
    """uint8 (n, 16, 16, 3) images with an up-down gradient and noise: rotations are visible."""
    g = torch.Generator().manual_seed(0)
    ramp = torch.linspace(40, 220, SIZE).view(1, SIZE, 1, 1)
    return (ramp + torch.randint(0, 60, (n, SIZE, SIZE, 3), generator=g)).clamp(0, 255).to(torch.uint8)


def optimizer(method, lr: float = 1e-3) -> torch.optim.Optimizer:
    return torch.optim.AdamW(parameter_groups(method.trained_parameters(), 1e-4), lr=lr)


@pytest.mark.parametrize("name", METHODS.names())
def test_one_step_is_finite_and_changes_the_weights(name):
    torch.manual_seed(0)
    method, _ = build(name)
    before = {k: v.clone() for k, v in method.encoder.state_dict().items()}
    out = method.step(fixed_batch())
    assert math.isfinite(out.loss.item())
    assert set(out.metrics) == set(method.metric_names)
    assert all(math.isfinite(v.item()) and not v.requires_grad for v in out.metrics.values())
    if method.chance is not None:
        assert 0 < method.chance < 1 and 0 <= out.metrics["pretext_acc"].item() <= 1
    opt = optimizer(method)
    out.loss.backward()
    opt.step()
    method.after_optimizer_step(1, 10)
    assert any(not torch.equal(before[k], v) for k, v in method.encoder.state_dict().items())
    # Teachers are moved by EMA, never by the optimizer.
    trained = {id(p) for _, p in method.trained_parameters()}
    for _, teacher in method.momentum_pairs():
        assert not any(id(p) in trained for p in teacher.parameters())


@pytest.mark.parametrize("name", METHODS.names())
def test_a_step_under_bf16_autocast_draws_float32_views_and_a_finite_loss(name):
    """What ``trainer.precision: bf16-mixed`` does on a CPU: the step inside autocast. The views are data,
    made in float32 (RotNet+Jitter's per-copy jitter once failed here, mixing bf16 into a float batch)."""
    torch.manual_seed(0)
    method, _ = build(name)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert all(v.dtype == torch.float32 for v in method.draw_views(fixed_batch()))
        assert math.isfinite(method.step(fixed_batch()).loss.float().item())


@pytest.mark.parametrize("name", METHODS.names())
def test_loss_falls_on_a_fixed_batch(name):
    torch.manual_seed(0)
    method, _ = build(name)
    opt, images, losses = optimizer(method), fixed_batch(), []
    for step in range(12):
        torch.manual_seed(1)  # the same views every step
        loss = method.step(images).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        method.after_optimizer_step(step + 1, 12)
        losses.append(loss.item())
    # From step 3: MoCo's queue (16 keys) holds this batch's own keys from then on, as it will for good.
    first, last = sum(losses[2:4]) / 2, sum(losses[-2:]) / 2
    assert last < first - 0.02 * abs(first), losses


@pytest.mark.parametrize("name", [n for n in METHODS.names() if METHODS.get(n).momentum_pairs is not Method.momentum_pairs])
@pytest.mark.parametrize("momentum", [0.5, 1.0])
def test_teacher_moves_only_with_momentum_below_one(name, momentum):
    torch.manual_seed(0)
    method, _ = build(name, tiny_settings(name, momentum=momentum, momentum_end=momentum))
    teachers = [t for _, t in method.momentum_pairs()]
    before = [[p.clone() for p in t.parameters()] for t in teachers]
    opt = optimizer(method, lr=0.1)
    method.step(fixed_batch()).loss.backward()
    opt.step()
    method.after_optimizer_step(1, 10)
    moved = any(not torch.equal(a, b) for t, old in zip(teachers, before) for a, b in zip(t.parameters(), old))
    assert moved == (momentum < 1)


def fit(name: str, root, epochs: int, stop_after: int | None = None) -> dict:
    """Pretrain ``name`` on 16 images for ``epochs`` (resuming from ``root``); ``stop_after`` kills it
    after that many epochs (their checkpoint written). Returns the module's state."""

    class Kill(pl.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            if stop_after is not None and trainer.current_epoch + 1 >= stop_after:
                trainer.should_stop = True

    pl.seed_everything(0, verbose=False)
    method, cfg = build(name)
    module = PretrainModule(method, cfg.pretrain.optim)
    trainer_cfg = TrainerConfig(accelerator="cpu", devices="1", progress=False)
    trainer = make_trainer(trainer_cfg, epochs, [Kill(), *checkpoint_callbacks(root)], root, validate=False)
    images = fixed_batch(16)
    data = loader(ArrayBatches(images.numpy(), torch.arange(16).numpy()), BATCH, True, True, trainer_cfg, seed=0)
    last = root / "last.ckpt"
    trainer.fit(module, data, ckpt_path=str(last) if last.is_file() else None, weights_only=True)
    return {k: v.clone() for k, v in module.state_dict().items()}


@pytest.mark.parametrize("name", METHODS.names())
def test_killed_and_resumed_run_continues_bit_identically(name, tmp_path):
    whole = fit(name, tmp_path / "whole", 2)
    killed = fit(name, tmp_path / "killed", 2, stop_after=1)
    assert any(not torch.equal(whole[k], killed[k]) for k in whole)  # it did stop half-way
    resumed = fit(name, tmp_path / "killed", 2)
    assert whole.keys() == resumed.keys()
    different = [k for k in whole if not torch.equal(whole[k], resumed[k])]
    assert different == [], different  # encoder, teachers, queue, centre, temperature


def test_checkpoint_holds_the_queue_and_the_centre():
    moco, _ = build("moco_v2")
    dino, _ = build("dino")
    assert "loss.memory_bank.bank" in moco.state_dict() and "loss.memory_bank.bank_ptr" in moco.state_dict()
    assert {"loss.center", "teacher_temperature"} <= set(dino.state_dict())


@pytest.mark.parametrize("name", METHODS.names())
def test_exported_encoder_loads_into_plain_torchvision(name, tmp_path):
    torch.manual_seed(0)
    method, _ = build(name)
    opt = optimizer(method, lr=0.1)
    method.step(fixed_batch()).loss.backward()
    opt.step()
    method.after_optimizer_step(1, 10)
    path = tmp_path / "encoder.safetensors"
    exported = method.exported_encoder()
    save_encoder(exported, path)
    plain = torchvision.models.resnet18()
    missing, unexpected = plain.load_state_dict(load_file(str(path)), strict=False)
    assert sorted(missing) == ["fc.bias", "fc.weight"] and unexpected == []
    assert torch.equal(plain.conv1.weight, exported.net.conv1.weight)
    if name == "dino":  # DINO exports its teacher, which differs from the student after a step
        assert exported is method.teacher_encoder
        assert not torch.equal(plain.conv1.weight, method.encoder.net.conv1.weight)


def test_view_specs_dino_two_global_then_local_crops():
    method, cfg = build("dino", ["encoders.e.settings.local_crops=3"])
    specs = method.view_specs()
    assert [s.size for s in specs] == [SIZE, SIZE, 8, 8, 8]
    assert specs[1].augment.solarize_prob == 0.2 and specs[0].augment.blur_prob == 1.0
    assert specs[2].augment.crop_scale_max == 0.4
    views = method.draw_views(fixed_batch())
    assert [tuple(v.shape) for v in views] == [(BATCH, 3, SIZE, SIZE)] * 2 + [(BATCH, 3, 8, 8)] * 3


def test_settings_resolve_from_every_level_and_only_the_chosen_method_is_hashed():
    cfg = config.load(None, [
        "pretrain.method.temperature=0.3", "pretrain.methods.dino.teacher_temp=0.05",
        "encoders.a.method=simclr", "encoders.b.method=dino", "encoders.c.method=dino", "encoders.c.settings.teacher_temp=0.06",
    ])
    assert method_settings(cfg, cfg.encoders["a"]).temperature == 0.3  # the legacy block
    assert method_settings(cfg, cfg.encoders["b"]).teacher_temp == 0.05
    assert method_settings(cfg, cfg.encoders["c"]).teacher_temp == 0.06
    assert "teacher_temp" not in settings_key(cfg, cfg.encoders["a"])
    assert settings_key(cfg, cfg.encoders["b"])["teacher_temp"] == 0.05
    assert "temperature" not in settings_key(cfg, cfg.encoders["b"])


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["pretrain.methods.dinoo.teacher_temp=0.1"], ["pretrain.methods.dinoo", "unknown method 'dinoo'", "registered: barlow_twins"]),
        (["encoders.a.method=simclr", "encoders.a.settings.teacher_temp=0.1"], ["encoders.a.settings.teacher_temp", "not a setting of method 'simclr'", "temperature"]),
        (["pretrain.methods.simclr.teacher_temp=0.1"], ["pretrain.methods.simclr.teacher_temp", "not a setting"]),
        (["encoders.a.method=dino", "pretrain.methods.dino.local_crop_size=100"], ["local_crop_size", "larger than the global crops"]),
        (["encoders.a.method=dino", "encoders.a.settings.teacher_temp=hot"], ["encoders.a.settings.teacher_temp", "number"]),
    ],
)
def test_bad_method_settings_name_the_key(overrides, expected):
    with pytest.raises(ConfigError) as err:
        config.load(None, overrides)
    for part in expected:
        assert part in str(err.value), str(err.value)


def test_pretrain_command_runs_new_methods_and_writes_their_columns(tmp_path):
    """``histossl pretrain`` from a config: DINO (teacher exported, collapse columns) and MoCo v2 (queue)."""
    from histossl.cli import main
    from histossl.train.common import read_csv

    empty = tmp_path / "c.yaml"
    empty.write_text("name: methods\n")
    sets = [
        "image_size=16", "synth.n_groups=4", "synth.per_class_per_group=6", "synth.image_size=16",
        "synth.classes=[tumour, stroma, adipose]", "pretrain.epochs=1", "pretrain.batch_size=8", "trainer.progress=false",
        "encoders.d.method=dino", "encoders.m.method=moco_v2",
        "pretrain.methods.dino.output_dim=64", "pretrain.methods.dino.local_crops=2", "pretrain.methods.moco_v2.queue_size=16",
    ]
    assert main(["pretrain", str(empty), "--out", str(tmp_path / "out"), *sum((["--set", s] for s in sets), [])]) == 0
    folders = {p.name.split("_target_")[0]: p for p in (tmp_path / "out" / "pretrain").iterdir()}
    assert set(folders) == {"dino", "moco_v2"}
    dino_rows = read_csv(folders["dino"] / "metrics.csv")
    assert list(dino_rows[0]) == ["epoch", "pretext_loss", "embedding_std", "effective_rank", "lr"]
    assert float(dino_rows[0]["embedding_std"]) > 0
    assert list(read_csv(folders["moco_v2"] / "metrics.csv")[0]) == ["epoch", "pretext_loss", "pretext_acc", "lr"]
    import json

    assert json.loads((folders["dino"] / "stage.json").read_text())["pretext_chance"] is None
    key = json.loads((folders["dino"] / "stage_key.json").read_text())
    assert key["pretrain"]["method"]["output_dim"] == 64 and "temperature" not in key["pretrain"]["method"]
    assert (folders["dino"] / "encoder.safetensors").is_file()


def test_checkpoint_from_before_the_interface_is_refused():
    from histossl.errors import HistosslError

    method, cfg = build("simclr")
    module = PretrainModule(method, cfg.pretrain.optim)
    with pytest.raises(HistosslError, match="older histossl"):
        module.on_load_checkpoint({"state_dict": {}, "rng_state": {"torch": torch.get_rng_state()}})
    saved: dict = {}
    module.on_save_checkpoint(saved)
    module.on_load_checkpoint(saved)  # its own format loads


@pytest.mark.parametrize("override, key", [("pretrain.views.crop_scale_max=0.2", "crop_scale_max"), ("pretrain.views.solarize_prob=2", "solarize_prob")])
def test_new_view_fields_are_range_checked(override, key):
    with pytest.raises(ConfigError, match=f"pretrain.views.{key}"):
        config.load(None, [override])


def test_solarize_inverts_bright_pixels_in_either_space():
    from histossl import augment

    x = torch.tensor([0.2, 0.5, 0.9]).view(1, 1, 1, 3).expand(2, 3, 1, 3).contiguous()
    out = augment.solarize(x, 1.0)
    assert torch.allclose(out[0, 0, 0], torch.tensor([0.2, 0.5, 0.1]))
    normalized = augment.solarize(augment.normalize(x.clone()), 1.0, normalized=True)
    assert torch.allclose(normalized, augment.normalize(out.clone()), atol=1e-6)
    assert torch.equal(augment.solarize(x, 0.0), x)


def test_solarize_in_the_fused_cpu_path_matches_the_float_path():
    from histossl import augment

    cfg = dataclasses.replace(config.ViewConfig(), solarize_prob=0.5, color_jitter_prob=0.0, hed_jitter_prob=0.0,
                              grayscale_prob=0.0, blur_prob=0.0, crop=False, hflip=False, vflip=False, rot90=False)
    images = fixed_batch()
    fused = augment.random_view(images, cfg, SIZE, torch.Generator().manual_seed(0), normalized=True)
    # Half the images solarized (p = 0.5 of 8): some pixels changed, every changed one mirrored around 0.5.
    plain = augment.normalize(augment.to_float(images))
    changed = ~torch.isclose(fused, plain, atol=1e-5)
    assert 0 < changed.flatten(1).any(1).sum() < BATCH
    mirrored = augment.normalize(1 - augment.to_float(images))
    assert torch.allclose(fused[changed], mirrored[changed], atol=1e-5)


def test_a_diverging_pretraining_stops_with_one_line(tmp_path, capsys):
    from histossl.cli import main

    empty = tmp_path / "c.yaml"
    empty.write_text("name: diverge\n")
    sets = [
        "image_size=16", "synth.n_groups=4", "synth.per_class_per_group=4", "synth.image_size=16",
        "synth.classes=[tumour, stroma]", "pretrain.epochs=2", "pretrain.batch_size=8", "trainer.progress=false",
        "encoders.v.method=vicreg", "pretrain.optim.lr=1e12", "encoders.v.settings.hidden_dim=32", "encoders.v.settings.projection_dim=32",
    ]
    code = main(["pretrain", str(empty), "--out", str(tmp_path / "out"), *sum((["--set", s] for s in sets), [])])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    (line,) = [x for x in err.splitlines() if x.startswith("histossl: error:")]
    assert "diverged" in line and "pretraining stage" in line and "pretrain.optim.lr" in line
    assert not list((tmp_path / "out" / "pretrain").glob("*/encoder.safetensors"))


def test_a_method_keeps_one_buffer_per_view_spec():
    # BYOL's two views have different specs, drawn by two random_view calls: the second must not land
    # in the first one's memory, and the next step reuses both.
    method, _ = build("byol")
    first = method.draw_views(fixed_batch())
    assert first[0].data_ptr() != first[1].data_ptr()
    kept = [v.clone() for v in first]
    second = method.draw_views(fixed_batch())
    assert all(torch.equal(v, k) for v, k in zip(first, kept))  # the last step's views are intact
    third = method.draw_views(fixed_batch())
    assert [v.data_ptr() for v in third] == [v.data_ptr() for v in first]
    assert {v.data_ptr() for v in second}.isdisjoint(v.data_ptr() for v in first)
