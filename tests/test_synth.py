"""The synthetic tissue set: deterministic, laid out as promised, and hard in the right way.

The three learnability tests train a standardised logistic regression on hand-made features of images
from some slides and score it on held-out slides (balanced accuracy, 7 classes, chance 1/7):
- colour statistics alone (mean and std per RGB channel) must not separate the classes (the issue's
  acceptance test: at most 0.60);
- simple structure features (power spectrum, gradient quantiles) must (well above the colour baseline);
- the 0/90/180/270 rotation of a patch must be predictable from orientation features above 0.40
  (chance 0.25) but not trivially (below 0.95), so a RotNet pretext task has something to learn.
Measured on seeds 0-3 when written: colour 0.43-0.46, structure 0.96-0.98, rotation 0.64-0.77.
"""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from histossl.config import SynthConfig
from histossl.data import synth
from histossl.errors import DataError

SMALL = SynthConfig(classes=["tumour", "adipose", "background"], n_groups=2, per_class_per_group=3, image_size=32, seed=3)
TRAIN_SLIDES, TEST_SLIDES = 5, 3


# ----------------------------------------------------------------------------------------------
# Determinism, layout, reuse


def test_same_seed_same_bytes_other_seed_different(tmp_path):
    a = synth.synthesize(tmp_path / "a", SMALL)
    b = synth.synthesize(tmp_path / "b", SMALL)
    c = synth.synthesize(tmp_path / "c", SynthConfig(**{**SMALL.__dict__, "seed": 4}))
    name = Path("slide01/adipose/slide01_adipose_0002.png")
    assert (a / name).read_bytes() == (b / name).read_bytes()
    assert (a / name).read_bytes() != (c / name).read_bytes()
    stain = synth.random_slide_stain(np.random.default_rng(0))
    one = synth.synth_image("tumour", np.random.default_rng(7), stain, 48)
    assert one.shape == (48, 48, 3) and one.dtype == np.uint8
    assert np.array_equal(one, synth.synth_image("tumour", np.random.default_rng(7), stain, 48))


def test_layout_counts_and_names(tmp_path):
    root = synth.synthesize(tmp_path / "set", SMALL)
    groups = sorted(p.name for p in root.iterdir() if p.is_dir())
    assert groups == ["slide00", "slide01"]
    for group in groups:
        assert sorted(p.name for p in (root / group).iterdir()) == sorted(SMALL.classes)
        for cls in SMALL.classes:
            files = sorted((root / group / cls).glob("*.png"))
            assert [f.name for f in files] == [f"{group}_{cls}_{i:04d}.png" for i in range(3)]
            with Image.open(files[0]) as image:
                assert image.size == (32, 32) and image.mode == "RGB"
    assert json.loads((root / "synth.json").read_text())["config"]["seed"] == 3
    assert not [p for p in tmp_path.iterdir() if p.name != "set"], "temporary folder left behind"


def test_second_call_reuses_the_set(tmp_path, monkeypatch):
    root = synth.synthesize(tmp_path / "set", SMALL)
    monkeypatch.setattr(synth, "synth_image", lambda *a, **k: pytest.fail("regenerated a complete set"))
    assert synth.synthesize(root, SMALL) == root


def test_foreign_or_different_folder_refused(tmp_path):
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "holiday.jpg").write_bytes(b"x")
    with pytest.raises(DataError, match="photos"):
        synth.synthesize(foreign, SMALL)
    root = synth.synthesize(tmp_path / "set", SMALL)
    with pytest.raises(DataError, match="set"):
        synth.synthesize(root, SynthConfig(**{**SMALL.__dict__, "per_class_per_group": 4}))


def test_killed_run_leaves_nothing(tmp_path, monkeypatch):
    calls = []

    def dies_on_fifth(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return np.zeros((32, 32, 3), np.uint8)

    monkeypatch.setattr(synth, "synth_image", dies_on_fifth)
    with pytest.raises(KeyboardInterrupt):
        synth.synthesize(tmp_path / "set", SMALL)
    assert list(tmp_path.iterdir()) == []


def test_unknown_class_is_named():
    with pytest.raises(ValueError, match="'glia'.*known: tumour, stroma"):
        synth.synthesize(Path("/nonexistent/never-written"), SynthConfig(classes=["tumour", "glia"]))
    with pytest.raises(ValueError, match="'glia'"):
        synth.synth_image("glia", np.random.default_rng(0), synth.random_slide_stain(np.random.default_rng(0)), 32)


def test_draw_grid(tmp_path):
    root = synth.synthesize(tmp_path / "set", SMALL)
    out = synth.draw_grid(root, tmp_path / "grid.png", per_class=2)
    with Image.open(out) as image:
        width, height = image.size
    assert width > 2 * 96 and height > len(SMALL.classes) * 96


# ----------------------------------------------------------------------------------------------
# What can be learnt from the images


@pytest.fixture(scope="module")
def slides():
    """(images (n, 64, 64, 3), class labels, slide ids) of the default classes, drawn in memory."""
    cfg = SynthConfig(n_groups=TRAIN_SLIDES + TEST_SLIDES, per_class_per_group=12)
    images, labels, groups = [], [], []
    for g in range(cfg.n_groups):
        stain = synth.random_slide_stain(np.random.default_rng([cfg.seed, g]))
        for label, cls in enumerate(cfg.classes):
            for i in range(cfg.per_class_per_group):
                rng = np.random.default_rng([cfg.seed, g, label, i])
                images.append(synth.synth_image(cls, rng, stain, cfg.image_size))
                labels.append(label)
                groups.append(g)
    return np.stack(images), np.array(labels), np.array(groups)


def held_out_balanced_accuracy(features: np.ndarray, labels: np.ndarray, groups: np.ndarray) -> float:
    """Train on the first TRAIN_SLIDES slides, score on the others."""
    train = groups < TRAIN_SLIDES
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    model.fit(features[train], labels[train])
    return balanced_accuracy_score(labels[~train], model.predict(features[~train]))


def colour_features(images: np.ndarray) -> np.ndarray:
    """(n, 6): mean and std of each RGB channel."""
    pixels = images.reshape(len(images), -1, 3).astype(float)
    return np.concatenate([pixels.mean(1), pixels.std(1)], axis=1)


def standardised_grey(images: np.ndarray) -> np.ndarray:
    """(n, h, w) grey images with zero mean and unit std each: no brightness or contrast left."""
    grey = images.astype(float).mean(-1)
    grey -= grey.mean((1, 2), keepdims=True)
    return grey / (grey.std((1, 2), keepdims=True) + 1e-6)


def structure_features(images: np.ndarray) -> np.ndarray:
    """(n, 20): log radial power spectrum in 12 bands, gradient-magnitude quantiles, 3rd/4th moments."""
    grey = standardised_grey(images)
    n, size = len(grey), grey.shape[1]
    power = np.abs(np.fft.fft2(grey)) ** 2
    radius = np.hypot(np.fft.fftfreq(size)[:, None], np.fft.fftfreq(size)[None, :])
    edges = np.geomspace(1 / size, 0.71, 13)
    spectrum = [np.log(power[:, (radius >= lo) & (radius < hi)].mean(1) + 1e-6) for lo, hi in zip(edges[:-1], edges[1:])]
    gy, gx = np.gradient(grey, axis=(1, 2))
    magnitude = np.hypot(gx, gy).reshape(n, -1)
    quantiles = np.quantile(magnitude, [0.1, 0.25, 0.5, 0.75, 0.9, 0.99], axis=1).T
    flat = grey.reshape(n, -1)
    moments = np.stack([(flat**3).mean(1), (flat**4).mean(1)], axis=1)
    return np.concatenate([np.stack(spectrum, 1), quantiles, moments], axis=1)


def orientation_features(images: np.ndarray) -> np.ndarray:
    """(n, 6): top-bottom and left-right brightness differences (halves and outer quarters),
    and the structure tensor's anisotropy (gx² - gy², gx·gy)."""
    grey = standardised_grey(images)
    size = grey.shape[1]
    half, quarter = size // 2, size // 4
    gy, gx = np.gradient(grey, axis=(1, 2))
    return np.stack(
        [
            grey[:, :half].mean((1, 2)) - grey[:, half:].mean((1, 2)),
            grey[:, :, :half].mean((1, 2)) - grey[:, :, half:].mean((1, 2)),
            grey[:, :quarter].mean((1, 2)) - grey[:, -quarter:].mean((1, 2)),
            grey[:, :, :quarter].mean((1, 2)) - grey[:, :, -quarter:].mean((1, 2)),
            (gx**2 - gy**2).mean((1, 2)),
            (gx * gy).mean((1, 2)),
        ],
        axis=1,
    )


def test_colour_statistics_do_not_separate_classes(slides):
    images, labels, groups = slides
    accuracy = held_out_balanced_accuracy(colour_features(images), labels, groups)
    assert accuracy <= 0.60, f"colour alone separates the classes: balanced accuracy {accuracy:.3f}"


def test_structure_separates_classes(slides):
    images, labels, groups = slides
    colour = held_out_balanced_accuracy(colour_features(images), labels, groups)
    structure = held_out_balanced_accuracy(structure_features(images), labels, groups)
    assert structure >= 0.80, f"structure features reach only {structure:.3f}"
    assert structure >= colour + 0.25, f"structure {structure:.3f} hardly beats colour {colour:.3f}"


def test_rotation_is_learnable_but_not_trivial(slides):
    images, _, groups = slides
    quarter_turns = np.random.default_rng(0).integers(0, 4, len(images))
    rotated = np.stack([np.rot90(image, k) for image, k in zip(images, quarter_turns)])
    accuracy = held_out_balanced_accuracy(orientation_features(rotated), quarter_turns, groups)
    assert 0.40 < accuracy < 0.95, f"rotation prediction accuracy {accuracy:.3f}"
