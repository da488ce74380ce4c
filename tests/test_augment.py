"""Batched, per-sample augmentation: shapes, identities, per-sample independence, stain algebra."""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from histossl import augment
from histossl.augment import colour, geometry, views
from histossl.config import ViewConfig

# Every op switched off: random_view is then a plain resize.
ALL_OFF = ViewConfig(
    crop=False,
    hflip=False,
    vflip=False,
    rot90=False,
    color_jitter_prob=0.0,
    grayscale_prob=0.0,
    blur_prob=0.0,
    hed_jitter_prob=0.0,
)
# skimage.color.rgb_from_hed (Ruifrok & Johnston 2001), written out here as the test's own reference.
RGB_FROM_HED = torch.tensor([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], dtype=torch.float64)


def _images(batch: int = 8, size: int = 32, seed: int = 0) -> torch.Tensor:
    """Smooth random colour images in (0, 1), ``(B, 3, size, size)``."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(batch, 3, 4, 4, generator=g)
    return F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False) * 0.8 + 0.1


def _stained(batch: int, size: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """H&E-like RGB built from known HED concentrations: (rgb (B, 3, S, S), concentrations (B, 3, S, S))."""
    g = torch.Generator().manual_seed(seed)
    h = torch.rand(batch, 1, size, size, generator=g, dtype=torch.float64) * 0.7 + 0.15
    e = torch.rand(batch, 1, size, size, generator=g, dtype=torch.float64) * 0.7 + 0.15
    d = torch.rand(batch, 1, size, size, generator=g, dtype=torch.float64) * 0.2
    conc = torch.cat([h, e, d], dim=1)
    density = torch.einsum("bshw,sc->bchw", conc, RGB_FROM_HED)
    return torch.exp(-density).float(), conc


def _deconvolve(rgb: torch.Tensor) -> torch.Tensor:
    """HED concentrations of ``(B, 3, H, W)`` RGB, the naive way (float64)."""
    density = -torch.log(rgb.double().clamp(min=1e-6))
    return torch.einsum("bchw,cs->bshw", density, torch.linalg.inv(RGB_FROM_HED))


def test_to_float_and_normalize():
    images = torch.randint(0, 256, (2, 5, 6, 3), dtype=torch.uint8)
    x = augment.to_float(images)
    assert x.shape == (2, 3, 5, 6) and x.dtype == torch.float32
    assert torch.allclose(x[1, 2], images[1, :, :, 2].float() / 255)
    normalized = augment.normalize(x)
    assert torch.allclose(normalized[:, 0], (x[:, 0] - 0.485) / 0.229)


def test_random_view_default_shapes_and_range():
    x = _images(batch=16, size=48)
    out = augment.random_view(x, ViewConfig(), 32, torch.Generator().manual_seed(0))
    assert out.shape == (16, 3, 32, 32) and out.dtype == torch.float32
    assert out.min() >= 0 and out.max() <= 1
    assert torch.isfinite(out).all()


def test_random_view_all_off_is_plain_resize():
    x = _images(batch=4, size=48)
    expected = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False)
    assert torch.allclose(augment.random_view(x, ALL_OFF, 32), expected, atol=1e-6)
    assert torch.equal(augment.random_view(x, ALL_OFF, 48), x)


def test_views_differ_per_sample_and_reproduce_with_a_seed():
    x = _images(batch=1, size=32).expand(64, 3, 32, 32).contiguous()
    cfg = ViewConfig()
    out = augment.random_view(x, cfg, 32, torch.Generator().manual_seed(1))
    distinct = {tuple(v.flatten()[::97].mul(1e4).round().tolist()) for v in out}
    assert len(distinct) >= 60  # 64 copies of one image, (almost) all different views
    again = augment.random_view(x, cfg, 32, torch.Generator().manual_seed(1))
    other = augment.random_view(x, cfg, 32, torch.Generator().manual_seed(2))
    assert torch.equal(out, again)
    assert not torch.allclose(out, other)


def test_rotate90_matches_torch_rot90_per_sample():
    x = torch.rand(8, 3, 5, 5)
    k = torch.tensor([0, 1, 2, 3, -1, 5, 2, 1])
    out = augment.rotate90(x, k)
    for i in range(8):
        assert torch.equal(out[i], torch.rot90(x[i], int(k[i]), dims=(-2, -1)))
    with pytest.raises(ValueError):
        augment.rotate90(torch.rand(2, 3, 4, 5), torch.zeros(2, dtype=torch.long))


@pytest.mark.parametrize("flip, dim", [("hflip", -1), ("vflip", -2)])
def test_flips_per_sample(flip, dim):
    x = torch.rand(32, 3, 8, 8)
    out = augment.random_view(x, dataclasses.replace(ALL_OFF, **{flip: True}), 8, torch.Generator().manual_seed(0))
    flipped = torch.tensor([torch.equal(o, xi.flip(dim)) for o, xi in zip(out, x)])
    kept = torch.tensor([torch.equal(o, xi) for o, xi in zip(out, x)])
    assert (flipped | kept).all()
    assert 4 <= flipped.sum() <= 28


def test_crop_grid_flips_and_quarter_turns_are_the_eight_symmetries():
    # Full-image crop (scale 1, ratio 1): the sampling grid only flips and rotates, at pixel centres.
    cfg = dataclasses.replace(ALL_OFF, crop=True, crop_scale_min=1.0, crop_ratio_max=1.0, hflip=True, vflip=True, rot90=True)
    x = torch.rand(64, 3, 8, 8)
    out = augment.random_view(x, cfg, 8, torch.Generator().manual_seed(0))
    symmetries = [lambda t, k=k: torch.rot90(t, k, (-2, -1)) for k in range(4)]
    symmetries += [lambda t, k=k: torch.rot90(t.flip(-1), k, (-2, -1)) for k in range(4)]
    seen = set()
    for o, xi in zip(out, x):
        match = [j for j, s in enumerate(symmetries) if torch.allclose(o, s(xi), atol=1e-5)]
        assert len(match) == 1
        seen.add(match[0])
    assert seen == set(range(8))


def test_random_resized_crop_full_box_is_plain_resize():
    for size_in, size_out in [(48, 32), (32, 48), (32, 32)]:
        x = _images(batch=4, size=size_in)
        out = augment.random_resized_crop(x, size_out, (1.0, 1.0), (1.0, 1.0))
        expected = F.interpolate(x, size=(size_out, size_out), mode="bilinear", align_corners=False)
        assert torch.allclose(out, expected, atol=1e-5)


def test_crop_boxes_fit_and_follow_the_scale_range():
    x = torch.zeros(512, 3, 40, 60)
    boxes = geometry._crop_boxes(x, (0.3, 0.6), (3 / 4, 4 / 3), torch.Generator().manual_seed(0))
    x0, y0, w, h = boxes.unbind(1)
    assert (x0 >= 0).all() and (y0 >= 0).all()
    assert (x0 + w <= 60 + 1e-3).all() and (y0 + h <= 40 + 1e-3).all()
    area = w * h / (40 * 60)
    assert area.min() >= 0.3 - 1e-4 and area.max() <= 0.6 + 1e-4
    ratio = w / h
    assert ratio.min() >= 3 / 4 - 1e-4 and ratio.max() <= 4 / 3 + 1e-4
    assert x0.std() > 1 and area.std() > 0.05  # independent per sample


def test_hed_jitter_without_noise_is_the_identity():
    rgb, _ = _stained(4, 16)
    out = augment.hed_jitter(rgb, sigma=0.0, bias=0.0, p=1.0)
    assert (out - rgb).abs().max() < 1e-3
    assert torch.equal(augment.hed_jitter(rgb, 0.5, 0.5, p=0.0), rgb)


def test_hed_jitter_moves_h_and_e_affinely_and_keeps_dab():
    rgb, conc = _stained(16, 16)
    sigma, bias = 0.05, 0.05
    out = augment.hed_jitter(rgb, sigma, bias, p=1.0, generator=torch.Generator().manual_seed(0))
    before, after = _deconvolve(rgb), _deconvolve(out)
    assert torch.allclose(before, conc, atol=1e-4)  # the test's own deconvolution is right
    assert torch.allclose(after[:, 2], before[:, 2], atol=1e-3)  # DAB untouched
    assert (after[:, :2] - before[:, :2]).abs().amax() > 0.02  # H and E moved
    # Per sample and stain, after = alpha * before + beta exactly, with alpha, beta in their ranges.
    slopes = []
    for stain in (0, 1):
        c, c_new = before[:, stain].flatten(1), after[:, stain].flatten(1)
        design = torch.stack([c, torch.ones_like(c)], dim=-1)  # (B, N, 2)
        fit = torch.linalg.lstsq(design, c_new.unsqueeze(-1)).solution.squeeze(-1)  # (B, 2)
        residual = (design @ fit.unsqueeze(-1)).squeeze(-1) - c_new
        assert residual.abs().max() < 1e-3
        assert ((fit[:, 0] - 1).abs() <= sigma + 1e-3).all() and (fit[:, 1].abs() <= bias + 1e-3).all()
        slopes.append(fit[:, 0])
    assert torch.stack(slopes).std(dim=1).min() > 0.01  # independent per sample


def test_color_jitter_identities_and_per_sample_gate():
    x = _images(batch=64, size=8)
    assert torch.equal(augment.color_jitter(x, 0.0, 0.0, 0.0, 0.0, p=1.0), x)
    assert torch.equal(augment.color_jitter(x, 0.4, 0.4, 0.4, 0.1, p=0.0), x)
    out = augment.color_jitter(x, 0.4, 0.4, 0.4, 0.1, p=0.5, generator=torch.Generator().manual_seed(0))
    unchanged = torch.tensor([torch.equal(o, xi) for o, xi in zip(out, x)])
    assert 16 <= unchanged.sum() <= 48  # not jittered: bit-exact; jittered: changed
    assert out.min() >= 0 and out.max() <= 1


def test_hue_rotation_keeps_luma_and_changes_colour():
    x = torch.rand(16, 3, 8, 8) * 0.2 + 0.4  # mid-range colours: no clamping
    out = augment.color_jitter(x, 0.0, 0.0, 0.0, 0.2, p=1.0, generator=torch.Generator().manual_seed(0))
    luma = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
    assert torch.allclose((out * luma).sum(1), (x * luma).sum(1), atol=1e-5)
    assert (out - x).abs().amax() > 0.01


def test_brightness_scales_each_sample_by_one_factor():
    x = torch.rand(32, 3, 8, 8) * 0.5 + 0.1  # factors up to 1.5 stay below 1
    out = augment.color_jitter(x, 0.5, 0.0, 0.0, 0.0, p=1.0, generator=torch.Generator().manual_seed(0))
    ratio = (out / x).flatten(1)
    assert (ratio.std(dim=1) < 1e-5).all()
    assert ratio[:, 0].min() >= 0.5 - 1e-5 and ratio[:, 0].max() <= 1.5 + 1e-5 and ratio[:, 0].std() > 0.1


def test_grayscale_equal_channels_where_applied():
    x = _images(batch=64, size=8)
    assert torch.equal(augment.random_grayscale(x, 0.0), x)
    out = augment.random_grayscale(x, 0.5, torch.Generator().manual_seed(0))
    grey = torch.tensor([torch.equal(o[0], o[1]) and torch.equal(o[1], o[2]) for o in out])
    kept = torch.tensor([torch.equal(o, xi) for o, xi in zip(out, x)])
    assert (grey ^ kept).all() and 16 <= grey.sum() <= 48
    # The grey level is the luma of the input.
    luma = (x * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1)
    assert torch.allclose(out[grey, 0], luma[grey], atol=1e-6)


def test_random_view_folded_grayscale_is_grey():
    # In random_view the grayscale matrix is multiplied into the colour matrix: check that path too.
    x = _images(batch=8, size=16)
    cfg = dataclasses.replace(ALL_OFF, grayscale_prob=1.0, color_jitter_prob=1.0)
    out = augment.random_view(x, cfg, 16, torch.Generator().manual_seed(0))
    assert torch.allclose(out[:, 0], out[:, 1], atol=1e-6) and torch.allclose(out[:, 1], out[:, 2], atol=1e-6)


def test_gaussian_blur_removes_high_frequencies():
    checker = ((torch.arange(16).view(16, 1) + torch.arange(16).view(1, 16)) % 2).float()
    x = checker.expand(8, 3, 16, 16).contiguous()
    out = augment.gaussian_blur(x, sigma_max=2.0, p=1.0, generator=torch.Generator().manual_seed(0))

    def high_frequency_energy(t: torch.Tensor) -> torch.Tensor:
        return (t[..., :, 1:] - t[..., :, :-1]).pow(2).mean(dim=(1, 2, 3))

    # sigma ~ U(0.1, 2): a small sigma barely blurs, so no sample gains energy and most lose most of it.
    ratio = high_frequency_energy(out) / high_frequency_energy(x)
    assert (ratio <= 1 + 1e-5).all() and (ratio < 0.1).sum() >= 4
    assert torch.equal(augment.gaussian_blur(x, 2.0, p=0.0), x)
    flat = torch.full((4, 3, 16, 16), 0.3)
    assert torch.allclose(augment.gaussian_blur(flat, 2.0, p=1.0), flat, atol=1e-6)  # kernels sum to 1
    # Not blurred: a unit impulse, bit-exact.
    partial = augment.gaussian_blur(x, 2.0, p=0.5, generator=torch.Generator().manual_seed(0))
    kept = torch.tensor([torch.equal(o, xi) for o, xi in zip(partial, x)])
    assert 0 < kept.sum() < 8


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_random_view_on_cuda_without_host_syncs():
    x = _images(batch=16, size=32).cuda()
    generator = torch.Generator(device="cuda").manual_seed(0)
    augment.random_view(x, ViewConfig(), 32, generator)  # first call copies the constants to the device
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = augment.random_view(x, ViewConfig(), 24, generator)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert out.shape == (16, 3, 24, 24) and out.device.type == "cuda"
    assert out.min() >= 0 and out.max() <= 1


def test_rotations_of_a_square_keep_pixels():
    # rot90 in random_view without a crop: the exact permutation path.
    cfg = dataclasses.replace(ALL_OFF, rot90=True)
    x = torch.rand(32, 3, 6, 6)
    out = augment.random_view(x, cfg, 6, torch.Generator().manual_seed(0))
    turns = [
        next(k for k in range(4) if torch.equal(o, torch.rot90(xi, k, (-2, -1)))) for o, xi in zip(out, x)
    ]
    assert len(set(turns)) == 4
    assert math.isclose(out.sum().item(), x.sum().item(), rel_tol=1e-6)


def _uint8_images(batch: int, size: int, seed: int = 0) -> torch.Tensor:
    """Cache-layout uint8 images ``(B, H, W, 3)`` with random pixels."""
    return torch.randint(0, 256, (batch, size, size, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def test_uint8_cpu_path_flips_and_turns_are_the_eight_symmetries_of_the_image(monkeypatch):
    # The CPU path of a uint8 batch in chunks of 5 images: no crop, no resize, exact pixel permutations.
    monkeypatch.setattr(views, "_CPU_CHUNK_BYTES", 5 * 3 * 8 * 8 * 4)
    cfg = dataclasses.replace(ALL_OFF, hflip=True, vflip=True, rot90=True)
    images = _uint8_images(64, 8)
    out = augment.random_view(images, cfg, 8, torch.Generator().manual_seed(0))
    assert out.dtype == torch.float32 and out.shape == (64, 3, 8, 8)
    x = augment.to_float(images)
    symmetries = [lambda t, k=k: torch.rot90(t, k, (-2, -1)) for k in range(4)]
    symmetries += [lambda t, k=k: torch.rot90(t.flip(-1), k, (-2, -1)) for k in range(4)]
    seen = [next(j for j, s in enumerate(symmetries) if torch.equal(o, s(xi))) for o, xi in zip(out, x)]
    assert set(seen) == set(range(8))
    normalized = augment.random_view(images, cfg, 8, torch.Generator().manual_seed(0), normalized=True)
    assert torch.allclose(normalized, augment.normalize(out), atol=1e-6)


def test_uint8_cpu_crops_are_whole_pixel_windows():
    # Areas in [1/4, 1], ratio 1, of a 16 px image, resized to 8 px: the draws that give an 8 px window
    # need no resampling, so whole-pixel boxes make them exact windows of the image.
    cfg = dataclasses.replace(ALL_OFF, crop=True, crop_scale_min=0.25, crop_ratio_max=1.0)
    images = _uint8_images(1, 16).expand(200, 16, 16, 3).contiguous()
    out = geometry._crop_uint8(images, cfg, 8, torch.Generator().manual_seed(0))
    planes = images[0].permute(2, 0, 1)
    windows = [
        (x0, y0)
        for o in out
        for y0 in range(9)
        for x0 in range(9)
        if torch.equal(o, planes[:, y0 : y0 + 8, x0 : x0 + 8])
    ]
    assert len(windows) >= 5 and len(set(windows)) >= 3
    full = geometry._crop_uint8(images, dataclasses.replace(cfg, crop_scale_min=1.0), 16, torch.Generator().manual_seed(1))
    assert torch.equal(full, planes.expand(200, 3, 16, 16))  # a full-image box is the image itself


def test_uint8_cpu_crop_corners_are_uniform_and_boxes_fit():
    cfg = dataclasses.replace(ALL_OFF, crop=True, crop_scale_min=0.3, crop_ratio_max=4 / 3)
    # A ramp image: the top-left output pixel tells the crop's corner (to within the bilinear resize).
    ramp = torch.arange(40).view(1, 40, 1, 1).expand(1024, 40, 40, 3).to(torch.uint8).contiguous()  # value = row
    out = geometry._crop_uint8(ramp, cfg, 40, torch.Generator().manual_seed(0))
    top = out[:, 0, 0, 0].float()
    bottom = out[:, 0, -1, 0].float()
    assert top.min() <= 2 and bottom.max() >= 37 and (bottom >= top).all()
    assert top.std() > 3  # corners spread over the image, not stuck at one place


def test_random_view_same_seed_same_view_on_the_cpu(monkeypatch):
    monkeypatch.setattr(views, "_CPU_CHUNK_BYTES", 3 * 3 * 12 * 12 * 4)  # chunks of 3 images, on threads
    images = _uint8_images(20, 16)
    a = augment.random_view(images, ViewConfig(), 12, torch.Generator().manual_seed(3))
    b = augment.random_view(images, ViewConfig(), 12, torch.Generator().manual_seed(3))
    c = augment.random_view(images, ViewConfig(), 12, torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.min() >= 0 and a.max() <= 1


def test_contrast_blends_towards_each_images_mean_grey():
    x = torch.rand(32, 3, 8, 8, generator=torch.Generator().manual_seed(1)) * 0.2 + 0.4  # no clamping in [0.6, 1.4]
    out = augment.color_jitter(x, 0.0, 0.4, 0.0, 0.0, p=1.0, generator=torch.Generator().manual_seed(0))
    luma = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
    mean = (x * luma).sum(1).mean(dim=(1, 2)).view(-1, 1, 1, 1)
    c = _slopes(x - mean, out - mean)
    assert torch.allclose(out - mean, c.view(-1, 1, 1, 1) * (x - mean), atol=1e-5)  # one factor per image
    c = c.view(-1, 1)
    assert c[:, 0].min() >= 0.6 - 1e-3 and c[:, 0].max() <= 1.4 + 1e-3 and c[:, 0].std() > 0.1
    assert torch.allclose((out * luma).sum(1).mean(dim=(1, 2)), mean.flatten(), atol=1e-5)  # mean grey kept


def _slopes(inputs: torch.Tensor, outputs: torch.Tensor) -> torch.Tensor:
    """Least-squares factor k per sample with outputs ~ k * inputs."""
    a, b = inputs.flatten(1), outputs.flatten(1)
    return (a * b).sum(1) / (a * a).sum(1)


def test_brightness_contrast_and_saturation_compose():
    # Mid-range colours and mild factors: no clamping, so the three steps compose exactly. Luma:
    # brightness scales it, contrast blends it towards its mean, saturation keeps it. Chroma (the
    # pixel minus its luma): all three scale it.
    x = torch.rand(32, 3, 8, 8, generator=torch.Generator().manual_seed(1)) * 0.2 + 0.4
    out = augment.color_jitter(x, 0.2, 0.2, 0.3, 0.0, p=1.0, generator=torch.Generator().manual_seed(0))
    luma = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
    y_in, y_out = (x * luma).sum(1, keepdim=True), (out * luma).sum(1, keepdim=True)
    m_in = y_in.mean(dim=(2, 3), keepdim=True)
    b = y_out.mean(dim=(2, 3), keepdim=True) / m_in  # contrast and saturation keep the mean luma
    bc = _slopes(y_in - m_in, y_out - b * m_in).view(-1, 1, 1, 1)
    assert torch.allclose(y_out, b * m_in + bc * (y_in - m_in), atol=1e-5)
    c = bc.flatten() / b.flatten()
    assert b.min() >= 0.8 - 1e-4 and b.max() <= 1.2 + 1e-4 and b.std() > 0.05
    assert c.min() >= 0.8 - 1e-3 and c.max() <= 1.2 + 1e-3 and c.std() > 0.05
    bcs = _slopes(x - y_in, out - y_out).view(-1, 1, 1, 1)
    assert torch.allclose(out - y_out, bcs * (x - y_in), atol=1e-5)
    s = bcs.flatten() / bc.flatten()
    assert s.min() >= 0.7 - 1e-3 and s.max() <= 1.3 + 1e-3 and s.std() > 0.05


def test_fused_uint8_path_equals_the_ops_one_by_one(monkeypatch):
    # A uint8 CPU batch takes a fused path (division by 255, colour matrix and normalisation in one
    # product; blur and solarize after normalising): given the same draws it must equal the public float
    # ops in the documented order, written out here one by one.
    assert [step.name for step in augment.PIPELINE] == ["hed_jitter", "colour", "blur", "solarize"]
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)  # one chunk, so the draws can be replayed
    cfg = dataclasses.replace(ViewConfig(), hed_jitter_prob=0.5, blur_prob=0.5, grayscale_prob=0.3, solarize_prob=0.5)
    images = _smooth_uint8_images(16, 20)
    for normalized in (False, True):
        out = augment.random_view(images, cfg, 16, torch.Generator().manual_seed(5), normalized=normalized)
        g = _chunk_generator(5)
        x = geometry._crop_uint8(images, cfg, 16, g).float() / 255
        x = augment.hed_jitter(x, cfg.hed_jitter_sigma, cfg.hed_jitter_bias, cfg.hed_jitter_prob, g)
        x = colour._colour_and_grey(
            x,
            cfg.color_jitter_brightness,
            cfg.color_jitter_contrast,
            cfg.color_jitter_saturation,
            cfg.color_jitter_hue,
            cfg.color_jitter_prob,
            cfg.grayscale_prob,
            g,
        )
        x = augment.gaussian_blur(x, cfg.blur_sigma_max, cfg.blur_prob, g)
        x = augment.solarize(x, cfg.solarize_prob, g)
        expected = augment.normalize(x) if normalized else x
        assert torch.allclose(out, expected, atol=2e-5), (out - expected).abs().max()
        assert not torch.allclose(out[: len(out) // 2], out[len(out) // 2 :])  # the ops did something


def _smooth_uint8_images(batch: int, size: int) -> torch.Tensor:
    """Smooth tissue-like uint8 pictures ``(B, H, W, 3)`` (bilinear upsampling of 4 x 4 noise)."""
    coarse = torch.randint(20, 236, (batch, 4, 4, 3), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    images = F.interpolate(coarse.permute(0, 3, 1, 2).float(), size=(size, size), mode="bilinear")
    return images.round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def _chunk_generator(seed: int) -> torch.Generator:
    """``random_view``'s generator for its one chunk when called with ``manual_seed(seed)``."""
    return torch.Generator().manual_seed(torch.randint(0, 2**62, (1,), generator=torch.Generator().manual_seed(seed)).item())


@pytest.mark.parametrize("normalized", [False, True])
def test_both_paths_follow_the_step_order_they_are_given(monkeypatch, normalized):
    # Mutation check: swapping two steps changes the view, and the fused uint8 path and the float path
    # still agree on the swapped order, so the order of PIPELINE is what runs on both paths.
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    cfg = dataclasses.replace(ViewConfig(), hed_jitter_prob=1.0, hed_jitter_sigma=0.3, hed_jitter_bias=0.3, color_jitter_prob=1.0, blur_prob=0.5, solarize_prob=0.5)
    images = _smooth_uint8_images(12, 20)
    hed, colour_step, blur, solar = augment.PIPELINE
    orders = {"documented": augment.PIPELINE, "colour first": (colour_step, hed, blur, solar), "solarize first": (solar, hed, colour_step, blur)}
    fused = {}
    for name, steps in orders.items():
        fused[name] = augment.random_view(images, cfg, 16, torch.Generator().manual_seed(7), normalized=normalized, steps=steps)
        g = _chunk_generator(7)
        x = augment.apply_steps(geometry._crop_uint8(images, cfg, 16, g).float() / 255, cfg, g, steps=steps)
        expected = augment.normalize(x) if normalized else x
        assert torch.allclose(fused[name], expected, atol=5e-5), (name, (fused[name] - expected).abs().max())
    assert (fused["documented"] - fused["colour first"]).abs().max() > 1e-2
    assert (fused["documented"] - fused["solarize first"]).abs().max() > 1e-2


def test_rotnet_jitter_runs_the_shared_steps_on_each_copy():
    # RotNet+Jitter: the geometry once per image, then the pipeline's steps (stain before colour) drawn
    # independently for every rotated copy; no jitter code of its own.
    from histossl.config import PretrainConfig
    from histossl.methods import METHODS
    from histossl.methods.rotnet import RotNetConfig, rotations
    from histossl.models.backbones import Encoder

    views_cfg = dataclasses.replace(ViewConfig(), hed_jitter_prob=1.0, color_jitter_prob=1.0, grayscale_prob=0.0, blur_prob=0.0)
    pretrain = dataclasses.replace(PretrainConfig(), views=views_cfg)
    method = METHODS.get("rotnet_jitter")(Encoder("resnet18"), RotNetConfig(), pretrain, 16)
    images = _smooth_uint8_images(6, 20)
    torch.manual_seed(11)
    (x,) = method.draw_views(images)
    torch.manual_seed(11)
    (spec,) = method.view_specs()
    base, _ = rotations(augment.random_view(images, spec.augment, 16, steps=()))
    expected = augment.hed_jitter(base, views_cfg.hed_jitter_sigma, views_cfg.hed_jitter_bias, 1.0)
    expected = augment.color_jitter(expected, views_cfg.color_jitter_brightness, views_cfg.color_jitter_contrast, views_cfg.color_jitter_saturation, views_cfg.color_jitter_hue, 1.0)
    assert torch.allclose(x, augment.normalize(expected), atol=1e-5)
    undone = [torch.rot90(copy, -k, (-2, -1)) for k, copy in enumerate(x.view(4, 6, 3, 16, 16)[:, 0])]
    assert all((undone[0] - other).abs().mean() > 1e-3 for other in undone[1:])  # each copy its own colours


def test_cpu_views_never_overwrite_a_batch_that_is_still_held():
    # The caller owns the output memory (a ViewBuffer of two slots used in turn): a batch stays intact
    # through the next call, the memory of the one before is reused (no fresh pages for every batch).
    images, buffer = _uint8_images(4, 16), augment.ViewBuffer()
    a = augment.random_view(images, ViewConfig(), 12, torch.Generator().manual_seed(0), out=buffer)
    kept = a.clone()
    b = augment.random_view(images, ViewConfig(), 12, torch.Generator().manual_seed(1), out=buffer)
    assert torch.equal(a, kept) and a.data_ptr() != b.data_ptr()
    c = augment.random_view(images, ViewConfig(), 12, torch.Generator().manual_seed(2), out=buffer)
    assert c.data_ptr() == a.data_ptr() and torch.equal(c, augment.random_view(images, ViewConfig(), 12, torch.Generator().manual_seed(2)))
    # Views saved for the backward pass survive the next draw: the training step's backward sees them intact.
    weight = torch.ones(1, 3, 1, 1, requires_grad=True)
    loss = F.conv2d(c, weight).square().sum()
    saved = c.clone()
    d = augment.random_view(images, ViewConfig(), 12, torch.Generator().manual_seed(3), out=buffer)
    assert d.data_ptr() != c.data_ptr()
    loss.backward()
    assert torch.allclose(weight.grad.flatten(), (2 * saved * saved.sum(1, keepdim=True)).sum(dim=(0, 2, 3)), rtol=1e-4)
    # Without a buffer every call gets fresh memory; another buffer never shares this one's.
    other = augment.random_view(images, ViewConfig(), 12, torch.Generator().manual_seed(4), out=augment.ViewBuffer())
    fresh = augment.random_view(images, ViewConfig(), 12, torch.Generator().manual_seed(5))
    assert {other.data_ptr(), fresh.data_ptr()}.isdisjoint({c.data_ptr(), d.data_ptr()})

