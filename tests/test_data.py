"""Data layer: indexing, decoding, splits, label subsets, the decode cache and ``data inspect``."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from histossl.config import SplitConfig
from histossl.data import cache, sources
from histossl.data.cache import decode_cached, resize_square
from histossl.data.inspect import format_inspect, inspect_path
from histossl.data.sources import UnreadableImage, load_index, read_rgb
from histossl.data.splits import label_subsets, load_or_make_split, make_split, save_split
from histossl.errors import ConfigError, DataError

# ----------------------------------------------------------------------------------------------
# Helpers

_IDC_INDEX: dict[Path, sources.ImageIndex] = {}


def idc_index(shared_data: Path) -> sources.ImageIndex:
    """Index idc-breast once per test session (10k files; reading the tree takes ~0.5 s)."""
    root = shared_data / "idc-breast"
    if root not in _IDC_INDEX:
        _IDC_INDEX[root] = load_index(root)
    return _IDC_INDEX[root]


def write_image(path: Path, color=(200, 50, 80), size=(12, 10), mode: str = "RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path)
    return path


def class_folders(root: Path, per_class: dict[str, int]) -> Path:
    for c, n in per_class.items():
        for i in range(n):
            write_image(root / c / f"img{i}.png", color=(10 * i, 100, 150))
    return root


def grouped_folders(root: Path, n_groups: int, classes=("benign", "tumour"), per_class: int = 3) -> Path:
    for g in range(n_groups):
        for c in classes:
            for i in range(per_class):
                write_image(root / f"patient{g:02d}" / c / f"p{g}_{i}.png", color=(g, i, 7))
    return root


def broken_files(root: Path) -> tuple[Path, Path]:
    """A PNG cut in half and a zero-byte PNG among good images of two classes."""
    class_folders(root, {"a": 4, "b": 4})
    big = write_image(root / "a" / "big.png", size=(64, 64))
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(big)
    truncated = root / "a" / "cut.png"
    truncated.write_bytes(big.read_bytes()[: len(big.read_bytes()) // 2])
    big.unlink()
    empty = root / "b" / "empty.png"
    empty.write_bytes(b"")
    return truncated, empty


# ----------------------------------------------------------------------------------------------
# Real data: idc-breast (patients as groups)


def test_idc_index_finds_patients_and_class_counts(shared_data):
    index = idc_index(shared_data)
    assert index.has_groups
    assert len(np.unique(index.groups)) == 279
    assert index.classes == ["0", "1"]
    assert np.bincount(index.labels).tolist() == [7500, 2694]
    assert index.splits is None
    assert all(p.is_absolute() for p in index.paths[:10])
    assert [str(p) for p in index.paths] == sorted(str(p) for p in index.paths)


def test_idc_inspect_reports_small_edge_patches(shared_data):
    report = inspect_path(shared_data / "idc-breast")
    assert report["n_groups"] == 279
    assert report["classes"] == {"0": 7500, "1": 2694}
    assert report["sizes"]["most_common"][0]["size"] == [50, 50]
    assert report["n_smaller_than_most_common"] == 87
    assert report["smaller_examples"]
    assert report["unreadable"] == []
    text = format_inspect(report)
    assert "smaller than the most common size: 87" in text and "groups: 279" in text


def test_idc_split_keeps_patients_whole_and_hits_fractions(shared_data):
    index = idc_index(shared_data)
    split = make_split(index, val_fraction=0.1, test_fraction=0.2, seed=0)
    for name in ("train", "val", "test"):
        others = np.unique(index.groups[split != name])
        assert not np.isin(np.unique(index.groups[split == name]), others).any(), name
        assert set(index.labels[split == name].tolist()) == {0, 1}, name
    assert abs((split == "test").mean() - 0.2) < 0.02
    assert abs((split == "val").mean() - 0.1) < 0.02
    for c in (0, 1):  # stratified: each class's share of test is close to the fraction too
        assert abs((split[index.labels == c] == "test").mean() - 0.2) < 0.03


def test_idc_split_and_subsets_are_seeded(shared_data):
    index = idc_index(shared_data)
    a, b = make_split(index, 0.1, 0.2, seed=3), make_split(index, 0.1, 0.2, seed=3)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, make_split(index, 0.1, 0.2, seed=4))
    train = np.flatnonzero(a == "train")
    fractions = [0.05, 0.25, 0.5, 1.0]
    subsets = label_subsets(index.labels, train, fractions, seed=1)
    again = label_subsets(index.labels, train, fractions, seed=1)
    other = label_subsets(index.labels, train, fractions, seed=2)
    assert all(np.array_equal(subsets[f], again[f]) for f in fractions)
    assert not np.array_equal(subsets[0.05], other[0.05])
    assert np.isin(subsets[0.05], subsets[0.25]).all() and np.isin(subsets[0.25], subsets[0.5]).all()
    assert np.array_equal(subsets[1.0], train)
    for f in fractions:
        assert set(index.labels[subsets[f]].tolist()) == {0, 1}
        assert abs(len(subsets[f]) / len(train) - f) < 0.01
        assert np.isin(subsets[f], train).all()


# ----------------------------------------------------------------------------------------------
# Layouts


def test_class_folders_ignore_other_files_and_accept_any_names(tmp_path):
    root = class_folders(tmp_path / "data", {"normal": 2, "tumour": 3})
    write_image(root / "normal" / "with space é.png")
    write_image(root / "tumour" / "日本 slide.jpg")
    (root / "normal" / "notes.txt").write_text("not an image")
    (root / "tumour" / ".hidden.png").write_bytes(b"junk")
    (root / "tumour" / "Thumbs.db").write_bytes(b"junk")
    index = load_index(root)
    assert index.classes == ["normal", "tumour"]
    assert np.bincount(index.labels).tolist() == [3, 4]
    assert not index.has_groups and len(np.unique(index.groups)) == len(index)
    names = {p.name for p in index.paths}
    assert "with space é.png" in names and "日本 slide.jpg" in names
    assert read_rgb(root / "tumour" / "日本 slide.jpg").shape == (10, 12, 3)


def test_grouped_folders(tmp_path):
    root = grouped_folders(tmp_path / "data", n_groups=4)
    index = load_index(root)
    assert index.has_groups
    assert sorted(np.unique(index.groups).tolist()) == [f"patient{g:02d}" for g in range(4)]
    assert index.classes == ["benign", "tumour"] and len(index) == 24


def test_symlink_loop_does_not_hang(tmp_path):
    root = class_folders(tmp_path / "data", {"a": 2, "b": 2})
    os.symlink(root, root / "a" / "loop")
    os.symlink(root / "b", root / "b" / "self")
    assert len(load_index(root)) == 4


def test_manifest_with_groups_and_splits(tmp_path):
    root = tmp_path / "data"
    for i in range(6):
        write_image(root / "imgs" / f"x {i}.png")
    absolute = root / "imgs" / "x 5.png"
    rows = ["path,label,group,split"]
    splits = ["train", "val", "test"]
    rows += [f"imgs/x {i}.png,{'tumour' if i % 2 else 'normal'},p{i // 2},{splits[i // 2]}" for i in range(5)]
    rows.append(f"{absolute},tumour,p2,test")
    (root / "manifest.csv").write_text("\n".join(rows) + "\n")
    index = load_index(root / "manifest.csv")
    assert index.root == root and index.has_groups
    assert index.classes == ["normal", "tumour"]
    assert index.splits.tolist() == ["train", "train", "val", "val", "test", "test"]
    # the manifest's split column wins over the fractions and the seed
    assert np.array_equal(make_split(index, 0.3, 0.3, seed=9), index.splits)


def test_manifest_without_split_column(tmp_path):
    root = tmp_path / "data"
    lines = ["path,label"] + [f"img{i}.png,{i % 2}" for i in range(8)]
    for i in range(8):
        write_image(root / f"img{i}.png")
    (root / "m.csv").write_text("\n".join(lines))
    index = load_index(root / "m.csv")
    assert index.splits is None and not index.has_groups
    assert np.bincount(index.labels).tolist() == [4, 4]


@pytest.mark.parametrize("bad_path", ["../outside.png", "sub/../../outside.png", "ABSOLUTE"])
def test_manifest_path_escaping_its_folder_is_refused(tmp_path, bad_path):
    root = tmp_path / "data"
    outside = write_image(tmp_path / "outside.png")
    write_image(root / "a.png")
    bad_path = str(outside) if bad_path == "ABSOLUTE" else bad_path
    (root / "m.csv").write_text(f"path,label\na.png,x\n{bad_path},y\n")
    with pytest.raises(DataError, match=r"m\.csv row 3.*outside the manifest's folder"):
        load_index(root / "m.csv")


def test_manifest_bad_split_value_names_the_row(tmp_path):
    root = tmp_path / "data"
    write_image(root / "a.png")
    write_image(root / "b.png")
    (root / "m.csv").write_text("path,label,split\na.png,x,train\nb.png,y,holdout\n")
    with pytest.raises(DataError, match=r"row 3: split 'holdout'"):
        load_index(root / "m.csv")


def test_missing_path_is_named(tmp_path):
    with pytest.raises(DataError, match="data path not found: .*nowhere"):
        load_index(tmp_path / "nowhere")


def test_folder_without_images_is_refused(tmp_path):
    (tmp_path / "data" / "a").mkdir(parents=True)
    (tmp_path / "data" / "a" / "readme.txt").write_text("x")
    with pytest.raises(DataError, match="no images"):
        load_index(tmp_path / "data")


def test_empty_class_folder_is_named(tmp_path):
    root = class_folders(tmp_path / "data", {"a": 2, "b": 2})
    (root / "empty_class").mkdir()
    with pytest.raises(DataError, match="empty_class holds no images"):
        load_index(root)
    assert any("empty_class" in p for p in inspect_path(root)["problems"])  # inspect reports, not refuses


def test_single_class_is_refused(tmp_path):
    root = class_folders(tmp_path / "data", {"only": 3})
    with pytest.raises(DataError, match="needs at least 2 classes"):
        load_index(root)


# ----------------------------------------------------------------------------------------------
# Decoding


def test_sixteen_bit_tiff_scales_not_clips(tmp_path):
    values = np.array([[0, 256, 32768, 65535]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "g16.tif")
    rgb = read_rgb(tmp_path / "g16.tif")
    assert rgb.dtype == np.uint8 and rgb.shape == (1, 4, 3)
    assert rgb[0, :, 0].tolist() == [0, 1, 128, 255]
    assert (rgb[..., 0] == rgb[..., 2]).all()


def test_rgba_is_composited_onto_white(tmp_path):
    write_image(tmp_path / "t.png", color=(255, 0, 0, 0), mode="RGBA", size=(3, 3))
    write_image(tmp_path / "o.png", color=(255, 0, 0, 255), mode="RGBA", size=(3, 3))
    assert read_rgb(tmp_path / "t.png")[0, 0].tolist() == [255, 255, 255]
    assert read_rgb(tmp_path / "o.png")[0, 0].tolist() == [255, 0, 0]


@pytest.mark.parametrize(
    "mode, color, expected", [("L", 77, [77, 77, 77]), ("P", 3, None), ("CMYK", (0, 0, 0, 0), [255, 255, 255])]
)
def test_other_modes_become_rgb(tmp_path, mode, color, expected):
    suffix = ".jpg" if mode == "CMYK" else ".png"
    write_image(tmp_path / f"x{suffix}", color=color, mode=mode, size=(4, 4))
    rgb = read_rgb(tmp_path / f"x{suffix}")
    assert rgb.shape == (4, 4, 3) and rgb.dtype == np.uint8
    if expected is not None:
        assert np.abs(rgb[0, 0].astype(int) - expected).max() <= 2


def test_truncated_and_empty_files_are_unreadable(tmp_path):
    truncated, empty = broken_files(tmp_path / "data")
    for path in (truncated, empty):
        with pytest.raises(UnreadableImage, match=path.name):
            read_rgb(path)
    report = inspect_path(tmp_path / "data")
    assert sorted(u["path"] for u in report["unreadable"]) == ["a/cut.png", "b/empty.png"]
    assert "unreadable: 2" in format_inspect(report)


def test_resize_keeps_aspect_and_centre_crops():
    rgb = np.zeros((10, 20, 3), dtype=np.uint8)
    rgb[:, 5:15] = 255  # the centre half of the width
    out = resize_square(rgb, 8)
    assert out.shape == (8, 8, 3)
    assert out[:, 1:7].min() > 200  # the crop keeps the centre, which is white


# ----------------------------------------------------------------------------------------------
# Decode cache


def test_decode_cached_refuses_or_skips_unreadable(tmp_path):
    truncated, empty = broken_files(tmp_path / "data")
    index = load_index(tmp_path / "data")
    with pytest.raises(DataError, match=r"2 unreadable image\(s\).*(cut|empty)\.png.*skip_unreadable"):
        decode_cached(index, 16, progress=False)
    decoded = decode_cached(index, 16, skip_unreadable=True, progress=False)
    assert decoded.images.shape == (len(index) - 2, 16, 16, 3)
    assert sorted(Path(p).name for p, _ in decoded.skipped) == ["cut.png", "empty.png"]
    kept = {index.paths[i] for i in decoded.keep}
    assert truncated not in kept and empty not in kept and len(kept) == len(index) - 2


def test_decode_cached_reuses_cache_and_notices_touched_files(tmp_path, monkeypatch):
    root = class_folders(tmp_path / "data", {"a": 3, "b": 2})
    index = load_index(root)
    first = decode_cached(index, 8, cache_dir=tmp_path / "cache", progress=False)
    assert first.images.shape == (5, 8, 8, 3) and first.keep.tolist() == [0, 1, 2, 3, 4]
    assert not first.images.flags.writeable
    assert first.images[3, 4, 4].tolist() == [0, 100, 150]  # b/img0.png, solid colour survives resizing

    def no_decoding(path):
        raise AssertionError(f"decoded {path} again")

    monkeypatch.setattr(sources, "read_rgb", no_decoding)
    second = decode_cached(index, 8, cache_dir=tmp_path / "cache", progress=False)
    assert np.array_equal(first.images, second.images)
    assert len(list((tmp_path / "cache").iterdir())) == 1  # no temp folder left behind

    st = os.stat(index.paths[0])
    os.utime(index.paths[0], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    with pytest.raises(AssertionError, match="decoded"):
        decode_cached(index, 8, cache_dir=tmp_path / "cache", progress=False)


def test_cache_root_defaults_to_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("HISTOSSL_CACHE_DIR", str(tmp_path / "env"))
    assert cache.cache_root() == tmp_path / "env"
    assert cache.cache_root(tmp_path / "given") == tmp_path / "given"


# ----------------------------------------------------------------------------------------------
# Splits and subsets on small data


def test_class_too_small_for_split_is_named(tmp_path):
    root = class_folders(tmp_path / "data", {"common": 20, "rare": 2})
    with pytest.raises(DataError, match=r"class 'rare' has 2 images.*needs at least 3"):
        make_split(load_index(root), 0.1, 0.2, seed=0)
    # without a validation split two images are enough
    split = make_split(load_index(root), 0.0, 0.2, seed=0)
    assert "val" not in split and set(split[load_index(root).labels == 1]) == {"train", "test"}


def test_grouped_split_needs_groups_per_class(tmp_path):
    root = grouped_folders(tmp_path / "data", n_groups=6, classes=("benign",))
    grouped_folders(root, n_groups=2, classes=("tumour",))  # tumour only in patient00, patient01
    with pytest.raises(DataError, match=r"class 'tumour' has 2 groups"):
        make_split(load_index(root), 0.1, 0.2, seed=0)


def test_small_grouped_split_puts_every_class_everywhere(tmp_path):
    index = load_index(grouped_folders(tmp_path / "data", n_groups=6))
    split = make_split(index, 0.2, 0.2, seed=1)
    for name in ("train", "val", "test"):
        assert set(index.labels[split == name].tolist()) == {0, 1}
        assert not np.isin(index.groups[split == name], index.groups[split != name]).any()


def test_label_subsets_validate_and_keep_every_class():
    labels = np.array([0] * 50 + [1] * 3)
    train = np.arange(53)
    subsets = label_subsets(labels, train, [0.05], seed=0)
    assert set(labels[subsets[0.05]].tolist()) == {0, 1}  # 5% of 3 rounds to 0; one is kept
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(ConfigError, match="fraction"):
            label_subsets(labels, train, [bad], seed=0)


def test_saved_split_is_reused_and_checked(tmp_path):
    root = class_folders(tmp_path / "data", {"a": 10, "b": 10})
    index = load_index(root)
    split_file = tmp_path / "study" / "split.csv"
    cfg = SplitConfig(val_fraction=0.2, test_fraction=0.2, seed=0)
    first = load_or_make_split(split_file, index, cfg)
    assert split_file.read_text().splitlines()[0] == "path,label,group,split"
    # a hand-edited saved split wins over recomputation: the file pins the study's test set
    edited = first.copy()
    edited[[0, 1]] = edited[[1, 0]] if first[0] != first[1] else ["test", "train"]
    save_split(split_file, index, edited)
    assert np.array_equal(load_or_make_split(split_file, index, cfg), edited)
    write_image(root / "a" / "new.png")
    with pytest.raises(DataError, match="changed since"):
        load_or_make_split(split_file, load_index(root), cfg)
    with pytest.raises(DataError, match="other split settings"):
        load_or_make_split(split_file, index, SplitConfig(seed=5))
