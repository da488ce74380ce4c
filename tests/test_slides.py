"""From slides to patches: tiling, unlabelled pools, the resumable cache, stain normalisation, a chain from slides."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from histossl import cli, config, study
from histossl.config import StainNormalizationConfig
from histossl.data import cache, stain
from histossl.data.cache import decode_cached
from histossl.data.inspect import format_inspect, inspect_path
from histossl.data.sources import load_index, read_rgb
from histossl.data.tile import TileSettings, tile_slides
from histossl.data.tissue import rgb_to_hsv
from histossl.errors import ConfigError, DataError, HistosslError

SLIDE = "wsi/CMU-1-Small-Region.svs"
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"  # ../shared/data beside the checkout


def write_image(path: Path, rgb: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb).save(path)
    return path


def noise_image(seed: int, size: int = 12) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def tiles(tmp_path_factory) -> Path:
    """The real slide tiled once: 224 px at 0.5 µm/px (the acceptance command)."""
    if not (SHARED_DATA / SLIDE).is_file():
        pytest.fail(f"real slide expected at {SHARED_DATA / SLIDE}")
    out = tmp_path_factory.mktemp("tiles") / "tiles"
    assert cli.main(["data", "tile", str(SHARED_DATA / "wsi"), "--out", str(out), "--patch-size", "224", "--mpp", "0.5"]) == 0
    return out


# ----------------------------------------------------------------------------------------------
# Tiling the real slide


def test_tile_writes_tissue_only_patches_and_a_manifest(tiles):
    patches = sorted((tiles / "CMU-1-Small-Region").glob("*.png"))
    rows = (tiles / "manifest.csv").read_text().splitlines()
    assert rows[0] == "path,slide,x,y,level,mpp,tissue_fraction"
    assert len(rows) - 1 == len(patches) >= 20  # about a third of the 9 x 13 grid is tissue
    assert len(patches) < 9 * 13  # and the glass was left out
    for patch in patches:
        rgb = np.asarray(Image.open(patch))
        assert rgb.shape == (224, 224, 3)
        _, saturation, _ = rgb_to_hsv(rgb)
        near_white = (rgb.min(axis=-1) > 215).mean()
        assert saturation.mean() > 0.15 and near_white < 0.5, f"{patch.name} is background"
    first = rows[1].split(",")
    assert first[1] == "CMU-1-Small-Region" and first[4] == "0" and float(first[5]) == pytest.approx(0.5, abs=0.01)
    assert float(first[6]) >= 0.5
    x, y = int(first[2]), int(first[3])
    step = 224 * 0.5 / 0.499  # level-0 pixels per patch: the slide is 0.499 µm/px
    assert round(round(x / step) * step) == x and round(round(y / step) * step) == y  # points of the grid
    assert first[0].endswith(f"_x{x}_y{y}.png")


def test_tile_rerun_skips_and_other_settings_retile(tiles, tmp_path, shared_data, capsys):
    out = tmp_path / "tiles"
    shutil.copytree(tiles, out)
    stamp = {p.name: p.stat().st_mtime_ns for p in (out / "CMU-1-Small-Region").glob("*.png")}
    assert cli.main(["data", "tile", str(shared_data / "wsi"), "--out", str(out), "--patch-size", "224", "--mpp", "0.5"]) == 0
    assert "already tiled, skipped" in capsys.readouterr().err
    assert {p.name: p.stat().st_mtime_ns for p in (out / "CMU-1-Small-Region").glob("*.png")} == stamp
    # A half-done slide (no marker) is redone from scratch, leftovers removed.
    (out / "CMU-1-Small-Region" / ".tiles.json").unlink()
    write_image(out / "CMU-1-Small-Region" / "stale.png", noise_image(0))
    assert cli.main(["data", "tile", str(shared_data / SLIDE), "--out", str(out), "--mpp", "1.0", "--patch-size", "64"]) == 0
    patches = list((out / "CMU-1-Small-Region").glob("*.png"))
    assert not (out / "CMU-1-Small-Region" / "stale.png").exists()
    assert {Image.open(p).size for p in patches} == {(64, 64)}


def test_tile_with_labels_writes_grouped_layout(tmp_path, shared_data):
    labels = tmp_path / "labels.csv"
    labels.write_text("slide,label\nCMU-1-Small-Region.svs,skin\n")
    manifest = tile_slides(shared_data / SLIDE, tmp_path / "out", TileSettings(patch_size=64, mpp=2.0), labels_csv=labels, progress=False)
    assert (tmp_path / "out" / "CMU-1-Small-Region" / "skin").is_dir()
    assert manifest.read_text().splitlines()[0] == "path,slide,label,x,y,level,mpp,tissue_fraction"
    unlabelled = load_index(manifest, labels=False)  # the manifest is a data set: slide as group
    assert unlabelled.has_groups and set(unlabelled.groups) == {"CMU-1-Small-Region"}


def test_bad_slides_are_named_and_the_others_go_on(tmp_path, shared_data, capsys):
    slides = tmp_path / "slides"
    slides.mkdir()
    shutil.copy(shared_data / SLIDE, slides / "good.svs")
    (slides / "notes.svs").write_text("not a slide at all\n")
    data = (shared_data / SLIDE).read_bytes()
    (slides / "cut.svs").write_bytes(data[: len(data) // 3])
    damaged = bytearray(data)  # header and directory intact, a tenth of the JPEG tiles zeroed
    damaged[len(data) // 2: len(data) * 6 // 10] = bytes(len(data) * 6 // 10 - len(data) // 2)
    (slides / "damaged.svs").write_bytes(bytes(damaged))
    code = cli.main(["data", "tile", str(slides), "--out", str(tmp_path / "out"), "--patch-size", "64", "--mpp", "2", "--workers", "2"])
    err = capsys.readouterr().err
    assert code == 1
    for name, why in (("notes.svs", "not a slide"), ("cut.svs", "not a slide"), ("damaged.svs", "cannot tile the slide")):
        assert any(f"{slides / name}: {why}" in line for line in err.splitlines()), name
    assert "3 of 4 slides failed (cut, damaged, notes)" in err
    assert (tmp_path / "out" / "good" / ".tiles.json").is_file()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["good", "manifest.csv"]
    assert "good/" in (tmp_path / "out" / "manifest.csv").read_text()


def test_slide_without_resolution_needs_an_override(tmp_path, shared_data, capsys):
    # The real slide with its Aperio MPP and AppMag fields renamed (same length: offsets stay valid).
    data = (shared_data / SLIDE).read_bytes().replace(b"|MPP = ", b"|XPP = ").replace(b"|AppMag = ", b"|XppMag = ")
    bare = tmp_path / "slides" / "bare.svs"
    bare.parent.mkdir()
    bare.write_bytes(data)
    code = cli.main(["data", "tile", str(bare), "--out", str(tmp_path / "out"), "--patch-size", "64", "--mpp", "2"])
    err = capsys.readouterr().err
    assert code == 1 and f"{bare}: no resolution in the slide's metadata" in err and "--slide-mpp" in err
    assert not (tmp_path / "out").exists()
    assert cli.main(["data", "tile", str(bare), "--out", str(tmp_path / "out"), "--patch-size", "64", "--mpp", "2",
                     "--slide-mpp", "0.5"]) == 0
    assert len(list((tmp_path / "out" / "bare").glob("*.png"))) >= 10
    # Magnification: from the objective power when the slide has one (20x slide, 5x patches = 4x downsample).
    assert cli.main(["data", "tile", str(shared_data / SLIDE), "--out", str(tmp_path / "mag"), "--patch-size", "64",
                     "--magnification", "5"]) == 0
    assert "mpp" in (tmp_path / "mag" / "manifest.csv").read_text() and ",1.996," in (tmp_path / "mag" / "manifest.csv").read_text()


def test_empty_folder_and_bad_options_are_one_line(tmp_path, shared_data, capsys):
    (tmp_path / "empty").mkdir()
    assert cli.main(["data", "tile", str(tmp_path / "empty"), "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(tmp_path / "empty") in err and "no slides" in err
    assert cli.main(["data", "tile", str(shared_data / SLIDE), "--out", str(tmp_path / "out"), "--tissue-fraction", "1.5"]) == 2
    assert "--tissue-fraction 1.5" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_tissue_threshold_that_keeps_nothing_writes_nothing(tmp_path, shared_data, capsys):
    code = cli.main(["data", "tile", str(shared_data / SLIDE), "--out", str(tmp_path / "out"), "--tissue-fraction", "1.0",
                     "--patch-size", "512", "--mpp", "2"])
    err = capsys.readouterr().err
    assert code == 1 and "no patch reaches --tissue-fraction 1" in err and "CMU-1-Small-Region.svs" in err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


# ----------------------------------------------------------------------------------------------
# Unlabelled data sets


def test_unlabelled_folder_at_any_depth_groups_by_first_level(tmp_path):
    write_image(tmp_path / "pool" / "slideA" / "region1" / "deep" / "a.png", noise_image(1))
    write_image(tmp_path / "pool" / "slideA" / "b.png", noise_image(2))
    write_image(tmp_path / "pool" / "slideB" / "c.png", noise_image(3))
    index = load_index(tmp_path / "pool", labels=False)
    assert len(index) == 3 and not index.labelled and index.classes == [] and (index.labels == -1).all()
    assert index.groups.tolist() == ["slideA", "slideA", "slideB"]
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    with pytest.raises(DataError, match="no images found at any depth"):
        load_index(tmp_path / "empty", labels=False)
    report = inspect_path(tmp_path / "pool", labels=False)
    assert report["n_images"] == 3 and report["n_groups"] == 2 and report["labelled"] is False
    text = format_inspect(report)
    assert "unlabelled" in text and "groups: 2" in text


def test_unlabelled_manifest_needs_no_label_column(tmp_path):
    for i in range(3):
        write_image(tmp_path / f"p{i}.png", noise_image(i))
    (tmp_path / "m.csv").write_text("path,group\np0.png,s1\np1.png,s1\np2.png,s2\n")
    index = load_index(tmp_path / "m.csv", labels=False)
    assert len(index) == 3 and index.groups.tolist() == ["s1", "s1", "s2"]
    with pytest.raises(DataError, match="path,label.*set datasets.<name>.labels: false"):
        load_index(tmp_path / "m.csv")


def test_unlabelled_target_is_refused_before_anything_is_written(tmp_path):
    with pytest.raises(ConfigError, match="target: data set 'pool' has labels: false"):
        config.load(None, ["target=pool", f"datasets.pool.path={tmp_path}", "datasets.pool.labels=false"])
    assert cli.main(["study", str(_write_yaml(tmp_path, "target: pool\ndatasets:\n  pool: {path: x, labels: false}\n")),
                     "--out", str(tmp_path / "out")]) == 2
    assert not (tmp_path / "out").exists()


def _write_yaml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_new_dataset_keys_keep_stage_folder_names():
    from histossl.train import pretrain

    cfg = config.load(None, ["encoders.e.method=rotnet"])
    stage = pretrain.plan_stages(cfg, cfg.encoders["e"])[0]
    assert "labels" not in stage.key["data"] and "stain_normalization" not in stage.key["data"]
    ref = config.load(None, ["encoders.e.method=rotnet", "datasets.target.synthetic=true",
                                 "datasets.target.stain_normalization.reference=x.png"])
    assert pretrain.plan_stages(ref, ref.encoders["e"])[0].folder != stage.folder


# ----------------------------------------------------------------------------------------------
# The decoded cache: bounded, resumable


def test_killed_cache_build_resumes_where_it_stopped(tmp_path, monkeypatch):
    for i in range(10):
        write_image(tmp_path / "pool" / f"s{i % 2}" / f"{i}.png", noise_image(i))
    (tmp_path / "pool" / "s0" / "bad.png").write_bytes(b"")
    index = load_index(tmp_path / "pool", labels=False)
    fresh = decode_cached(index, 8, cache_dir=tmp_path / "fresh", skip_unreadable=True, progress=False)
    monkeypatch.setattr(cache, "BLOCK", 4)
    real, calls = cache._decode_one, []

    class Killed(Exception):
        pass

    def dies_after_six(task):
        calls.append(task[0])
        if len(calls) > 6:
            raise Killed
        return real(task)

    monkeypatch.setattr(cache, "_decode_one", dies_after_six)
    with pytest.raises(Killed):
        decode_cached(index, 8, cache_dir=tmp_path / "c", skip_unreadable=True, progress=False)
    partial = [p for p in (tmp_path / "c").iterdir() if p.name.endswith(".partial")]
    assert len(partial) == 1 and json.loads((partial[0] / "progress.json").read_text())["done"] == 4
    calls.clear()
    monkeypatch.setattr(cache, "_decode_one", lambda task: (calls.append(task[0]), real(task))[1])
    resumed = decode_cached(index, 8, cache_dir=tmp_path / "c", skip_unreadable=True, progress=False)
    assert calls == index.paths[4:]  # only the images after the last marker were decoded again
    assert np.array_equal(resumed.images, fresh.images) and resumed.keep.tolist() == fresh.keep.tolist()
    assert [p for p, _ in resumed.skipped] == [str(tmp_path / "pool" / "s0" / "bad.png")]
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == [p.name for p in (tmp_path / "fresh").iterdir()]


# ----------------------------------------------------------------------------------------------
# Stain normalisation against naive references of the published algorithms


def _real_image(shared_data: Path, folder: str, size: int = 48) -> np.ndarray:
    path = sorted((shared_data / "crc-he-mini" / folder).iterdir())[0]
    return read_rgb(path)[:size, :size]


def naive_macenko(img: np.ndarray, ref_stains: np.ndarray, ref_max: np.ndarray) -> np.ndarray:
    """Macenko et al. 2009 step by step, one pixel at a time (Io 240, beta 0.15, alpha 1%)."""
    pixels = [tuple(int(c) for c in px) for px in img.reshape(-1, 3)]
    od = [[-math.log((c + 1) / 240) for c in px] for px in pixels]
    tissue = [v for v in od if min(v) >= 0.15]
    mean = [sum(v[k] for v in tissue) / len(tissue) for k in range(3)]
    cov = [[sum((v[a] - mean[a]) * (v[b] - mean[b]) for v in tissue) / (len(tissue) - 1) for b in range(3)] for a in range(3)]
    _, vectors = np.linalg.eigh(np.array(cov))
    e1, e2 = vectors[:, 1], vectors[:, 2]
    e1, e2 = (e1 if e1.sum() >= 0 else -e1), (e2 if e2.sum() >= 0 else -e2)
    angles = sorted(math.atan2(sum(v[k] * e2[k] for k in range(3)), sum(v[k] * e1[k] for k in range(3))) for v in tissue)
    lo, hi = np.percentile(angles, 1), np.percentile(angles, 99)
    v_lo = [math.cos(lo) * e1[k] + math.sin(lo) * e2[k] for k in range(3)]
    v_hi = [math.cos(hi) * e1[k] + math.sin(hi) * e2[k] for k in range(3)]
    h, e = (v_lo, v_hi) if v_lo[0] > v_hi[0] else (v_hi, v_lo)
    h = [c / math.sqrt(sum(x * x for x in h)) for c in h]
    e = [c / math.sqrt(sum(x * x for x in e)) for c in e]
    # Least squares per pixel via the 2x2 normal equations.
    hh, ee, he = sum(x * x for x in h), sum(x * x for x in e), sum(a * b for a, b in zip(h, e))
    det = hh * ee - he * he
    conc = []
    for v in od:
        hv, ev = sum(a * b for a, b in zip(h, v)), sum(a * b for a, b in zip(e, v))
        conc.append(((ee * hv - he * ev) / det, (hh * ev - he * hv) / det))
    max_h, max_e = np.percentile([c[0] for c in conc], 99), np.percentile([c[1] for c in conc], 99)
    out = []
    for ch, ce in conc:
        ch, ce = ch / max_h * ref_max[0], ce / max_e * ref_max[1]
        out.append([min(255, max(0, round(240 * math.exp(-(ref_stains[k, 0] * ch + ref_stains[k, 1] * ce))))) for k in range(3)])
    return np.array(out, dtype=np.uint8).reshape(img.shape)


def naive_reinhard(img: np.ndarray, ref_mean, ref_std) -> np.ndarray:
    """Reinhard et al. 2001, eq. 1-6 and their inverses, one pixel at a time."""
    rgb2lms = [[0.3811, 0.5783, 0.0402], [0.1967, 0.7244, 0.0782], [0.0241, 0.1288, 0.8444]]
    lms2rgb = np.linalg.inv(rgb2lms).tolist()

    def to_lab(px):
        lms = [max(sum(rgb2lms[i][j] * px[j] / 255 for j in range(3)), 1 / 255) for i in range(3)]
        L, M, S = (math.log10(c) for c in lms)
        return [(L + M + S) / math.sqrt(3), (L + M - 2 * S) / math.sqrt(6), (L - M) / math.sqrt(2)]

    def to_rgb(lab):
        l, a, b = lab[0] / math.sqrt(3), lab[1] / math.sqrt(6), lab[2] / math.sqrt(2)
        lms = [10 ** (l + a + b), 10 ** (l + a - b), 10 ** (l - 2 * a)]
        return [min(255, max(0, round(255 * sum(lms2rgb[i][j] * lms[j] for j in range(3))))) for i in range(3)]

    labs = [to_lab([int(c) for c in px]) for px in img.reshape(-1, 3)]
    mean = [sum(v[k] for v in labs) / len(labs) for k in range(3)]
    std = [math.sqrt(sum((v[k] - mean[k]) ** 2 for v in labs) / len(labs)) for k in range(3)]
    out = [to_rgb([(v[k] - mean[k]) / std[k] * ref_std[k] + ref_mean[k] for k in range(3)]) for v in labs]
    return np.array(out, dtype=np.uint8).reshape(img.shape)


def test_macenko_matches_the_naive_reference(shared_data):
    source, reference = _real_image(shared_data, "NORM"), _real_image(shared_data, "TUM")
    target = stain.fit_reference("macenko", reference, "ref")
    assert target.stain_matrix.shape == (3, 2) and np.allclose(np.linalg.norm(target.stain_matrix, axis=0), 1)
    assert (target.stain_matrix > 0).all() and target.stain_matrix[0, 0] > target.stain_matrix[0, 1]  # H absorbs red more
    ours = stain.normalize(source, target)
    naive = naive_macenko(source, target.stain_matrix, target.max_concentrations)
    assert np.abs(ours.astype(int) - naive.astype(int)).max() <= 1
    assert not np.array_equal(ours, source)
    # The reference normalised to itself changes little.
    assert np.abs(stain.normalize(reference, target).astype(int) - reference.astype(int)).mean() < 6


def test_reinhard_matches_the_naive_reference_and_the_reference_statistics(shared_data):
    source, reference = _real_image(shared_data, "ADI"), _real_image(shared_data, "LYM")
    target = stain.fit_reference("reinhard", reference, "ref")
    ours = stain.normalize(source, target)
    naive = naive_reinhard(source, target.lab_mean, target.lab_std)
    assert np.abs(ours.astype(int) - naive.astype(int)).max() <= 1
    mean, _ = stain.reinhard_stats(ours)
    assert np.allclose(mean, target.lab_mean, atol=0.03)  # up to rounding and clipping to uint8


@pytest.mark.parametrize("method", ["macenko", "reinhard"])
def test_background_and_single_colour_patches_fall_back_and_are_counted(tmp_path, shared_data, method):
    reference = sorted((shared_data / "crc-he-mini" / "TUM").iterdir())[0]
    for i in range(2):
        shutil.copy(sorted((shared_data / "crc-he-mini" / "NORM").iterdir())[i], tmp_path / f"tissue{i}.jpg")
    white = write_image(tmp_path / "white.png", np.full((32, 32, 3), 245, np.uint8))
    write_image(tmp_path / "flat.png", np.full((32, 32, 3), (170, 60, 140), np.uint8))
    index = load_index(tmp_path, labels=False)
    setting = StainNormalizationConfig(method=method, reference=str(reference))
    raw = decode_cached(index, 16, progress=False)
    normalised = decode_cached(index, 16, progress=False, stain_normalization=setting)
    assert normalised.stain_fallbacks == 2
    rows = {p.name: i for i, p in enumerate(index.paths)}
    assert np.array_equal(normalised.images[rows["white.png"]], raw.images[rows["white.png"]])
    assert not np.array_equal(normalised.images[rows["tissue0.jpg"]], raw.images[rows["tissue0.jpg"]])
    # Raw and normalised caches do not collide; nor do the two methods.
    folders = {p.name for p in cache.cache_root().iterdir()}
    assert len(folders) == 2
    assert cache._cache_key(index, 16, setting) != cache._cache_key(index, 16, None)
    other = StainNormalizationConfig(method="reinhard" if method == "macenko" else "macenko", reference=str(reference))
    assert cache._cache_key(index, 16, setting) != cache._cache_key(index, 16, other)
    assert white.exists()


def test_all_background_reference_is_one_line_and_writes_nothing(tmp_path, capsys):
    write_image(tmp_path / "pool" / "a.png", noise_image(0))
    blank = write_image(tmp_path / "blank.png", np.full((64, 64, 3), 250, np.uint8))
    index = load_index(tmp_path / "pool", labels=False)
    for method in ("macenko", "reinhard"):
        with pytest.raises(DataError, match=f"stain reference {blank}: no stained tissue"):
            decode_cached(index, 8, cache_dir=tmp_path / "cache", progress=False,
                          stain_normalization=StainNormalizationConfig(method=method, reference=str(blank)))
    assert not (tmp_path / "cache").exists()
    assert cli.main(["data", "inspect", str(tmp_path / "pool"), "--unlabelled", "--stain-reference", str(blank)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(blank) in err


def test_inspect_shows_the_reference_stain_matrix(shared_data, capsys):
    reference = sorted((shared_data / "crc-he-mini" / "TUM").iterdir())[0]
    assert cli.main(["data", "inspect", str(shared_data / "kather2016-mini"), "--stain-reference", str(reference)]) == 0
    out = capsys.readouterr().out
    assert "Macenko stain matrix (OD, R G B): haematoxylin [" in out and "Reinhard l-alpha-beta mean" in out


# ----------------------------------------------------------------------------------------------
# A chain from slides: unlabelled tiles first, then the labelled target


@pytest.mark.slow
def test_chain_from_slide_tiles_to_a_labelled_target_runs_end_to_end(tiles, tmp_path, shared_data):
    cfg = config.load(Path(__file__).resolve().parents[1] / "configs" / "slides-chain.yaml", [
        f"datasets.tiles.path={tiles}", f"datasets.crc.path={shared_data / 'crc-he-mini'}",
        "image_size=16", "pretrain.epochs=1", "pretrain.batch_size=16",
        "downstream.fractions=[0.5]", "downstream.seeds=[0]", "downstream.modes=[frozen]", "downstream.lr_schedules=[constant]",
        "downstream.frozen_epochs=2", "downstream.baselines=[]", "trainer.progress=false",
    ])
    assert cfg.encoders["simclr_slides_crc"].chain == ["tiles", "crc"] and not cfg.datasets["tiles"].labels
    out = tmp_path / "study"
    report = study.run_study(cfg, out)
    assert report.is_file()
    stages = {json.loads(p.read_text())["chain"]: json.loads(p.read_text()) for p in (out / "pretrain").glob("*/stage.json")}
    assert set(stages) == {"crc", "tiles", "tiles>crc"}
    n_tiles = len(list((tiles / "CMU-1-Small-Region").glob("*.png")))
    assert stages["tiles"]["n_images"] == n_tiles  # an unlabelled pool: every patch
    n_train = sum(1 for line in (out / "split.csv").read_text().splitlines() if line.endswith(",train"))
    assert stages["tiles>crc"]["n_images"] == stages["crc"]["n_images"] == n_train < 70  # the target: its train split only
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert {r["pretrain_chain"] for r in records} >= {"tiles>crc"}


def test_stain_and_labels_keys_round_trip_and_are_checked(tmp_path):
    cfg = config.load(None, ["datasets.target.synthetic=true", "datasets.target.stain_normalization.method=reinhard",
                             "datasets.target.stain_normalization.reference=ref.png",
                             f"datasets.pool.path={tmp_path}", "datasets.pool.labels=false"])
    assert cfg.datasets["target"].stain_normalization == StainNormalizationConfig("reinhard", "ref.png")
    assert config.from_dict(config.to_dict(cfg)) == cfg
    with pytest.raises(ConfigError, match=r"datasets.target.stain_normalization: expected .*vahadane"):
        config.load(None, ["datasets.target.stain_normalization.method=vahadane"])
    with pytest.raises(ConfigError, match="datasets.target.stain_normalization.reference: give the reference image"):
        config.load(None, ["datasets.target.synthetic=true", "datasets.target.stain_normalization.method=macenko"])
