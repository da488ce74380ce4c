"""``histossl init DATA``: a commented study config fitted to the data set it inspects.

A newcomer's first config is the one most likely to be wrong (a batch larger than the data, an image
size the images do not have, the synthetic quickstart's settings on real patches). This looks at the
data (classes, counts, groups, the size of a sample of images) and writes the seed report's
protocol (RotNet, RotNet+Jitter and SimCLR, then an MLP head on 5-100% of the labels, fine-tuned or
frozen, cosine or constant lr, against a supervised baseline) at a size a CPU finishes, with a
comment on each choice and on what to raise on a GPU. The text is loaded and validated before it is
written, so the file it writes always loads.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

from PIL import Image

from histossl import config as config_mod
from histossl.data.sources import scan
from histossl.errors import HistosslError

SAMPLE = 200  # image headers read to find the image size (a header is a few hundred bytes)
CPU_IMAGE_SIZE = 64  # a CPU study at 64 px takes tens of minutes; the seed report used 224 on a GPU


def _image_side(paths: list[Path]) -> tuple[int | None, str]:
    """The most common shorter side of a sample of the images, and a description of what was seen."""
    step = max(1, len(paths) // SAMPLE)
    sizes = Counter()
    for path in paths[::step][:SAMPLE]:
        try:
            with Image.open(path) as img:
                sizes[img.size] += 1
        except Exception:  # noqa: BLE001 - an unreadable file is reported by `histossl data inspect`
            continue
    if not sizes:
        return None, "no readable image in the sample"
    (w, h), n = sizes.most_common(1)[0]
    return min(w, h), f"{w}x{h} px ({n} of {sum(sizes.values())} sampled images)"


def _batch(n: int, cap: int) -> int:
    """The largest power of two up to ``cap`` that leaves at least two batches in ``n`` images (at least 2)."""
    size = 2
    while size * 2 <= cap and size * 4 <= n:
        size *= 2
    return size


def render(data: str | Path) -> str:
    """The commented YAML text of a study on ``data`` (an image folder or a CSV manifest)."""
    index, problems = scan(data)
    source = os.path.abspath(Path(data).expanduser())  # the folder, or the manifest file itself
    n, classes = len(index), index.classes
    counts = {c: int((index.labels == i).sum()) for i, c in enumerate(classes)}
    side, seen = _image_side(index.paths)
    image_size = min(side or CPU_IMAGE_SIZE, CPU_IMAGE_SIZE)
    stem = "small" if image_size <= 64 else "standard"
    n_groups = len(set(index.groups.tolist())) if index.has_groups else 0
    val_fraction, test_fraction = 0.15, 0.25
    n_train = int(n * (1 - val_fraction - test_fraction) * 0.8)  # whole groups make the train split smaller than its share
    pretrain_batch = _batch(n_train, 64)
    smallest = max(1, min(counts.values()))
    downstream_batch = _batch(n_train // 4, 32)
    imbalance = max(counts.values()) / smallest
    groups_line = (
        f"{n_groups} groups (patients or slides) found: each is kept whole within one split"
        if n_groups else "no groups found: each image is its own group (give ROOT/<group>/<class>/<image> or a group column if images share a patient)"
    )
    notes = "".join(f"\n#   note: {p}" for p in problems)
    return f"""\
# Study config written by `histossl init {data}`, fitted to what it found there:
#   {n} images, {len(classes)} classes ({", ".join(f"{c}: {k}" for c, k in counts.items())})
#   {groups_line}
#   image size: {seen}{notes}
# The seed report's protocol at a CPU size: RotNet, RotNet+Jitter and SimCLR pretrained from scratch,
# then an MLP head on 5/25/50/100% of the labels, encoder fine-tuned or frozen, cosine schedule or a
# constant lr, against a supervised baseline. Run it, then rerun the same command to resume:
#   histossl study {{this file}} --out out/{Path(index.root).name}
# On a GPU: image_size {side or 224} (your images), backbone resnet50 with the standard stem, more epochs,
# seeds [0, 1, 2], and trainer.precision bf16-mixed (see configs/seed-report.yaml).
name: {Path(index.root).name or "study"}
seed: 0
image_size: {image_size}  # every image is decoded once, resized on its shorter side and centre-cropped to this square
datasets:
  target:
    path: {json.dumps(source)}
split:  # by group when there are groups; a manifest's split column wins
  val_fraction: {val_fraction}
  test_fraction: {test_fraction}
backbone:
  name: resnet18
  stem: {stem}  # small: 3x3 first conv and no max-pool, for patches of 64 px and less
pretrain:
  epochs: 10
  batch_size: {pretrain_batch}  # about {n_train} training images: at least two batches an epoch
  optim:
    optimizer: adamw  # few steps on a CPU: AdamW converges faster than SGD
    lr: 0.001
    weight_decay: 1.0e-4
    warmup_epochs: 1
encoders:  # a RotNet step sees 4 copies of each image, a SimCLR step 2: same compute per stage
  rotnet: {{method: rotnet, epochs: 4}}
  rotnet_jitter: {{method: rotnet_jitter, epochs: 4}}
  simclr: {{method: simclr, epochs: 8}}
downstream:
  fractions: [0.05, 0.25, 0.5, 1.0]  # of the labelled train split
  modes: [finetune, frozen]
  lr_schedules: [cosine, constant]
  seeds: [0]  # one seed has no interval over seeds: the verdict needs [0, 1, 2] or more to show anything
  baselines: [random]  # add imagenet once `histossl weights path resnet18` holds the weights
  # Trained to convergence: a run stops once its validation balanced accuracy has not improved for
  # `patience` validations, after at least `min_steps` optimizer steps (5% of the labels is a few
  # batches an epoch: fewer steps leave it at chance), within `epochs` (the most a run may take; the
  # report flags a run that ends there still improving: then raise it).
  epochs: 30
  patience: 5
  min_steps: 300
  frozen_epochs: 100
  batch_size: {downstream_batch}  # a label subset smaller than this trains in one batch
  lr: 0.002
  constant_lr: 0.0002  # the seed report's 5e-6 is for 224 px and many more steps
  encoder_lr_scale: 0.5
  class_weighted: {"true" if imbalance > 1.5 else "false"}  # largest class / smallest: {imbalance:.1f}
trainer:
  accelerator: auto
  devices: auto
  precision: 32-true
  progress: true
"""


def write_init(data: str | Path, out: Path) -> Path:
    """Write the config for ``data`` to ``out`` (never over an existing file); returns ``out``."""
    out = Path(out)
    if out.exists():
        raise HistosslError(f"{out} exists; choose another --out or delete it")
    text = render(data)
    tmp = out.with_name(f".{out.name}.check.yaml")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(text, encoding="utf-8")
        config_mod.load(tmp)  # the file written must load: a bug here must not reach a user's first study
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out
