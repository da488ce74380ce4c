"""``histossl data inspect``: what a data set holds before anything trains on it.

Every image is opened and fully decoded (a header alone does not reveal a truncated file), in a
thread pool since Pillow releases the GIL while decoding.
"""

from __future__ import annotations

import os
from collections import Counter
from multiprocessing.pool import ThreadPool
from pathlib import Path

import numpy as np
from PIL import Image

from histossl.data.sources import scan

N_EXAMPLES = 5


def inspect_path(path: str | Path, labels: bool = True, stain_reference: str | Path | None = None) -> dict:
    """Describe a data set: layout, classes, groups, image sizes and modes, unreadable files.

    Args:
        path: An image folder or a CSV manifest.
        labels: False: an unlabelled pool (``labels: false``), images at any depth.
        stain_reference: Also fit Macenko and Reinhard to this image and report its stain matrix.

    Returns:
        A JSON-ready dict. Paths in it are relative to ``root``.

    Raises:
        DataError: The path is missing, holds no images, or a manifest row is bad; the stain
            reference is all background.
    """
    stain_report = None
    if stain_reference is not None:  # first: a bad reference is reported before the long scan
        from histossl.data.stain import describe

        stain_report = describe(stain_reference)
    index, problems = scan(path, labels)
    source = Path(os.path.abspath(Path(path).expanduser()))
    headers = _read_headers(index.paths)
    rel = [p.relative_to(index.root).as_posix() for p in index.paths]
    readable = [(r, h) for r, h in zip(rel, headers) if "error" not in h]
    return {
        "root": str(index.root),
        "layout": _layout(source, index.has_groups, index.labelled),
        "labelled": index.labelled,
        "n_images": len(index),
        "classes": {c: int((index.labels == i).sum()) for i, c in enumerate(index.classes)},
        **_group_report(index),
        **_size_report(readable),
        "modes": dict(Counter(h["mode"] for _, h in readable).most_common()),
        "unreadable": [{"path": r, "reason": h["error"]} for r, h in zip(rel, headers) if "error" in h],
        "problems": problems,
        "manifest_splits": None if index.splits is None else dict(Counter(index.splits.tolist())),
        "stain_reference": stain_report,
    }


def _layout(source: Path, has_groups: bool, labelled: bool = True) -> str:
    if not labelled:
        kind = "csv manifest (path" + (",group" if has_groups else "") + ")" if source.is_file() else "images at any depth"
        return f"unlabelled, {kind}" + (", first-level folder as group" if has_groups and not source.is_file() else "")
    if source.is_file():
        return "csv manifest (path,label" + (",group" if has_groups else "") + ")"
    return "ROOT/<group>/<class>/<image>" if has_groups else "ROOT/<class>/<image>"


def _read_header(path: Path) -> dict:
    try:
        with Image.open(path) as img:
            size, mode = img.size, img.mode
            img.load()
        return {"size": size, "mode": mode}
    except Exception as err:  # Pillow raises many types for broken files
        return {"error": str(err).splitlines()[0] if str(err) else type(err).__name__}


def _read_headers(paths: list[Path]) -> list[dict]:
    with ThreadPool(min(8, os.cpu_count() or 1)) as pool:
        return pool.map(_read_header, paths, chunksize=64)


def _group_report(index) -> dict:
    if not index.has_groups:
        return {"n_groups": None, "group_sizes": None, "groups": {}}
    groups: dict[str, dict[str, int]] = {}
    for group, label in zip(index.groups.tolist(), index.labels.tolist()):
        per_class = groups.setdefault(group, {})
        name = index.classes[label] if label >= 0 else "unlabelled"
        per_class[name] = per_class.get(name, 0) + 1
    sizes = np.array([sum(v.values()) for v in groups.values()])
    return {
        "n_groups": len(groups),
        "group_sizes": {"min": int(sizes.min()), "median": float(np.median(sizes)), "max": int(sizes.max())},
        "groups": groups,
    }


def _size_report(readable: list[tuple[str, dict]]) -> dict:
    if not readable:
        return {"sizes": None, "n_smaller_than_most_common": 0, "smaller_examples": []}
    counts = Counter(h["size"] for _, h in readable)
    (common_w, common_h), _ = counts.most_common(1)[0]
    widths = [h["size"][0] for _, h in readable]
    heights = [h["size"][1] for _, h in readable]
    smaller = [(r, h["size"]) for r, h in readable if h["size"][0] < common_w or h["size"][1] < common_h]
    return {
        "sizes": {
            "most_common": [{"size": list(s), "count": n} for s, n in counts.most_common(5)],
            "n_distinct": len(counts),
            "min_width": min(widths), "max_width": max(widths),
            "min_height": min(heights), "max_height": max(heights),
        },
        "n_smaller_than_most_common": len(smaller),
        "smaller_examples": [{"path": r, "size": list(s)} for r, s in smaller[:N_EXAMPLES]],
    }


def format_inspect(report: dict) -> str:
    """One screen of text from :func:`inspect_path`'s report."""
    lines = [f"{report['root']}  ({report['layout']})", f"images: {report['n_images']}"]
    if report.get("labelled", True):
        lines.append("classes: " + ", ".join(f"{c}: {n}" for c, n in report["classes"].items()))
    else:
        lines.append("classes: none (unlabelled: pretraining only)")
    if report["n_groups"] is None:
        lines.append("groups: none (each image is its own group)")
    else:
        g = report["group_sizes"]
        per_group = f"min {g['min']}, median {g['median']:g}, max {g['max']}"
        lines.append(f"groups: {report['n_groups']} (images per group: {per_group})")
        single = sum(1 for per_class in report["groups"].values() if len(per_class) == 1)
        if report.get("labelled", True):
            lines.append(f"  groups holding a single class: {single}")
    if report.get("manifest_splits"):
        lines.append("manifest splits: " + ", ".join(f"{s}: {n}" for s, n in report["manifest_splits"].items()))
    sizes = report["sizes"]
    if sizes:
        common = ", ".join(f"{s['size'][0]}x{s['size'][1]}: {s['count']}" for s in sizes["most_common"])
        lines.append(f"sizes (w x h): {common}  [{sizes['n_distinct']} distinct]")
        lines.append(f"  width {sizes['min_width']}..{sizes['max_width']}, "
                     f"height {sizes['min_height']}..{sizes['max_height']}")
        lines.append(f"  smaller than the most common size: {report['n_smaller_than_most_common']}")
        lines.extend(f"    {e['path']} ({e['size'][0]}x{e['size'][1]})" for e in report["smaller_examples"])
    lines.append("modes: " + ", ".join(f"{m}: {n}" for m, n in report["modes"].items()))
    unreadable = report["unreadable"]
    lines.append(f"unreadable: {len(unreadable)}")
    lines.extend(f"  {u['path']}: {u['reason']}" for u in unreadable[:10])
    if len(unreadable) > 10:
        lines.append(f"  ... and {len(unreadable) - 10} more")
    lines.extend(f"problem: {p}" for p in report["problems"])
    ref = report.get("stain_reference")
    if ref:
        m = ref["macenko_stain_matrix"]
        lines.append(f"stain reference {ref['path']}:")
        lines.append(f"  Macenko stain matrix (OD, R G B): haematoxylin {m['haematoxylin_od']}, eosin {m['eosin_od']}")
        lines.append(f"  Macenko 99th-percentile concentrations (H, E): {ref['macenko_max_concentrations']}")
        lines.append(f"  Reinhard l-alpha-beta mean {ref['reinhard_lab_mean']}, std {ref['reinhard_lab_std']}")
    return "\n".join(lines)
