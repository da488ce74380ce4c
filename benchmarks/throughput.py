"""Training throughput of histossl against its own model cost and against a conventional pipeline.

One process, one run, five numbers, all in *source images per second* (a SimCLR image with two views
and a RotNet image with four rotated copies count once)::

    python benchmarks/throughput.py --method simclr --backbone resnet18 --image-size 64 --batch-size 128 --json

- ``model_only_img_s``: forward + backward + optimizer step of the encoder, head and loss on a batch of
  ready-made views (made once by histossl's own views, then reused), in a bare loop; measured before
  and after ``end_to_end`` and averaged over time, so a load that drifts during the run cancels out.
- ``end_to_end_img_s``: histossl's real training: the decoded uint8 cache (``decode_cached``, warmed
  before timing), ``ArrayBatches`` and ``loader`` from ``histossl.train.common``, and a Lightning
  ``Trainer.fit`` of the real module (``PretrainModule`` for a pretext method, ``DownstreamModule`` with
  ``train=True`` for ``supervised``) built by ``make_trainer`` from the trainer config. Timed from the end
  of the last warm-up batch to the end of the last batch, so loading, augmentation, the step, Lightning's
  logging and the lr scheduler are all inside.
- ``reference_img_s``: the same model and loss fed by the conventional pipeline: a torchvision-style
  image-folder data set read with PIL (``torchvision.datasets.folder.default_loader``), per-image PIL
  transforms equivalent to the method's views, a ``DataLoader`` with ``--reference-workers`` workers.
- ``data_path_img_s`` / ``reference_data_path_img_s``: each data path alone. histossl's runs the real
  ``method.step`` (or ``DownstreamModule.training_step``) under ``no_grad`` with the backbone replaced by a
  stub that returns zero features, so only the heads (a few small matmuls) remain of the model.

A table goes to stdout; with ``--json`` the last line is one JSON object with those keys (and the
settings, versions and load averages). ``--skip-model`` measures the two data paths only (null model
numbers), for large images where a CPU step would take minutes.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
import platform
import sys
import tempfile
import time
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "idc-breast"


def method_choices() -> list[str]:
    """Every registered pretext method, and the supervised baseline."""
    from histossl.methods import METHODS

    return [*METHODS.names(), "supervised"]

KEYS = ("model_only_img_s", "end_to_end_img_s", "reference_img_s", "data_path_img_s", "reference_data_path_img_s")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--method", choices=method_choices(), default="simclr")
    p.add_argument("--backbone", default="resnet18")
    p.add_argument("--stem", choices=("standard", "small"), default="standard")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=10, help="timed steps (batches) per measurement")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps before each measurement")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="image folder (ROOT/<class>/ or ROOT/<group>/<class>/)")
    p.add_argument("--cache-dir", default="", help="decoded-image cache ('' : histossl's default)")
    p.add_argument("--reference-workers", type=int, default=2, help="DataLoader workers of the conventional pipeline")
    p.add_argument("--num-workers", type=int, default=0, help="trainer.num_workers of histossl's loader")
    p.add_argument("--precision", default=None, help="trainer.precision (default: bf16-mixed on CUDA, 32-true on CPU)")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None, help="default: on with CUDA")
    p.add_argument("--compile", action="store_true", help="trainer.compile (torch.compile of the encoder)")
    p.add_argument("--skip-model", action="store_true", help="measure the two data paths only")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--optimizer", choices=("sgd", "adamw", "lars"), default=None, help="pretrain.optim.optimizer (default: histossl's)")
    p.add_argument("--lr", type=float, default=None, help="pretrain.optim.lr (default: histossl's)")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------------------
# Setup


def build_config(args: argparse.Namespace, cuda: bool):
    """histossl's Config for the run: defaults everywhere except the benchmark's settings."""
    from histossl import config

    precision = args.precision or ("bf16-mixed" if cuda else "32-true")
    channels_last = cuda if args.channels_last is None else args.channels_last
    return config.from_dict(
        {
            "seed": args.seed,
            "image_size": args.image_size,
            "cache_dir": args.cache_dir,
            "backbone": {"name": args.backbone, "stem": args.stem},
            "pretrain": {"batch_size": args.batch_size, "optim": {k: v for k, v in (("optimizer", args.optimizer), ("lr", args.lr)) if v is not None}},
            "downstream": {"batch_size": args.batch_size},
            "trainer": {
                "accelerator": "gpu" if cuda else "cpu",
                "devices": "1",
                "precision": precision,
                "num_workers": args.num_workers,
                "channels_last": channels_last,
                "compile": args.compile,
                "progress": False,
            },
        }
    )


class Bench:
    """The method's real module plus what the benchmark needs to drive its pieces separately."""

    def __init__(self, args: argparse.Namespace, cfg, n_classes: int, device: torch.device) -> None:
        from histossl.methods import METHODS
        from histossl.models.backbones import build_encoder
        from histossl.models.heads import classifier_head
        from histossl.train.downstream import DownstreamModule
        from histossl.train.pretrain import PretrainModule, prepare_encoder

        self.args, self.cfg, self.device = args, cfg, device
        self.supervised = args.method == "supervised"
        encoder = build_encoder(cfg.backbone, "random")
        prepare_encoder(encoder, cfg)
        self.encoder = encoder
        if self.supervised:
            d = cfg.downstream
            head = classifier_head(encoder.num_features, n_classes, d.head, d.hidden_dim, d.dropout)
            self.module = DownstreamModule(encoder, head, cfg, d.lr, "cosine", None)
            self.views = d.views
        else:
            from histossl.config import EncoderConfig
            from histossl.methods import method_settings

            settings = method_settings(cfg, EncoderConfig(method=args.method))
            self.method = METHODS.get(args.method)(encoder, settings, cfg.pretrain, cfg.image_size)
            self.module = PretrainModule(self.method, cfg.pretrain.optim)
            self.views = cfg.pretrain.views
        self.module.to(device)

    def optimizer(self) -> torch.optim.Optimizer:
        from histossl.train.common import make_optimizer, parameter_groups

        if self.supervised:
            d = self.cfg.downstream
            return make_optimizer(d.optimizer, self.module.parameters(), d.lr, d.weight_decay)
        o = self.cfg.pretrain.optim
        groups = parameter_groups(self.method.trained_parameters(), o.weight_decay)
        return make_optimizer(o.optimizer, groups, o.lr, o.weight_decay, o.momentum)

    def model_loss(self, views: list[torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        """Encoder + head + loss on ready-made normalised ``views``: what the step does after its views.

        ``views``: the method's ``draw_views`` output (supervised: one view, ``labels`` the classes). A
        method's own ``step`` runs with ``draw_views`` answering ``views``, so nothing here knows a method.
        """
        if self.supervised:
            return F.cross_entropy(self.module.head(self.encoder(views[0])), labels)
        self.method.draw_views = lambda images: views  # an instance attribute shadows the method
        try:
            return self.method.step(None).loss
        finally:
            del self.method.draw_views

    def real_step_loss(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """histossl's own step on a uint8 batch: views on the device, then model and loss."""
        if self.supervised:
            return F.cross_entropy(self.module(images, train=True), labels)
        return self.method.step(images).loss

    def capture_views(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The normalised views histossl's step feeds the model for ``images`` (and the labels)."""
        with torch.no_grad():
            if self.supervised:
                seen: list[torch.Tensor] = []
                with StubEncoder(self, record=seen):
                    self.real_step_loss(images, labels)
                return [seen[0]], labels
            return list(self.method.draw_views(images)), labels


class StubEncoder:
    """Context manager: the backbone's ``net`` returns zero features, so a step costs only its data path."""

    def __init__(self, bench: Bench, record: list | None = None) -> None:
        self.bench, self.record = bench, record

    def __enter__(self) -> None:
        encoder, record = self.bench.encoder, self.record
        self.net = encoder.net
        features = encoder.num_features

        class Zeros(nn.Module):
            def forward(self, x: torch.Tensor) -> torch.Tensor:
                if record is not None:
                    record.append(x)
                return x.flatten(1)[:, :1].mul(0).expand(-1, features)  # depends on x: nothing skipped

        encoder.net = Zeros()

    def __exit__(self, *exc) -> None:
        self.bench.encoder.net = self.net


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed_rows(n_images: int, batch: int, batches: int, seed: int) -> np.ndarray:
    """Row indices for exactly ``batches`` full batches (images repeat when the data set is small)."""
    need = batch * batches
    rng = np.random.default_rng(seed)
    return rng.permutation(np.resize(np.arange(n_images), max(need, n_images)))[:need]


# ----------------------------------------------------------------------------------------------
# histossl's data path and training


def histossl_loader(bench: Bench, images: np.ndarray, labels: np.ndarray, batches: int):
    from histossl.train.common import ArrayBatches, loader

    rows = timed_rows(len(images), bench.args.batch_size, batches, bench.args.seed)
    dataset = ArrayBatches(images, rows, labels)
    return loader(dataset, bench.args.batch_size, shuffle=True, drop_last=True, cfg=bench.cfg.trainer, seed=bench.args.seed)


def measure_model_only(bench: Bench, images: np.ndarray, labels: np.ndarray) -> float:
    """Forward + backward + optimizer step on one ready-made batch of views, reused every step.

    The module's weights and buffers are put back afterwards: full-lr steps without warm-up on one
    batch can blow a method up (VICReg at SGD lr 0.06), and ``end_to_end`` must start from the init.
    """
    args, device = bench.args, bench.device
    saved = copy.deepcopy(bench.module.state_dict())
    batch = torch.from_numpy(np.ascontiguousarray(images[: args.batch_size])).to(device)
    y = torch.from_numpy(labels[: args.batch_size]).to(device)
    x, target = bench.capture_views(batch, y)
    x, target = [v.detach().clone() for v in x], target.clone()
    optimizer = bench.optimizer()
    bench.module.train()
    autocast = _autocast(bench)
    start = 0.0
    for i in range(args.warmup + args.steps):
        if i == args.warmup:
            sync(device)
            start = time.perf_counter()
        model_step(bench, optimizer, autocast, x, target)
    sync(device)
    seconds = time.perf_counter() - start
    bench.module.load_state_dict(saved)
    return args.batch_size * args.steps / seconds


def model_step(bench: Bench, optimizer, autocast, x, target) -> None:
    """One forward, backward and optimizer step of the benchmarked model and loss."""
    optimizer.zero_grad(set_to_none=True)
    with autocast():
        loss = bench.model_loss(x, target)
    loss.backward()
    optimizer.step()


def _autocast(bench: Bench):
    """The autocast context Lightning's precision plugin uses, so the bare loops match the trainer."""
    import contextlib

    precision = bench.cfg.trainer.precision
    if precision.startswith("bf16"):
        return lambda: torch.autocast(bench.device.type, dtype=torch.bfloat16)
    if precision.startswith("16"):
        return lambda: torch.autocast(bench.device.type, dtype=torch.float16)
    return contextlib.nullcontext


def measure_data_path(bench: Bench, images: np.ndarray, labels: np.ndarray) -> float:
    """histossl's loader, host-to-device copy and the real step's views, with a stub backbone."""
    args, device = bench.args, bench.device
    data = histossl_loader(bench, images, labels, args.warmup + args.steps)
    non_blocking = device.type == "cuda"
    start = 0.0
    with torch.no_grad(), StubEncoder(bench):
        for i, (x, y) in enumerate(data):
            if i == args.warmup:
                sync(device)
                start = time.perf_counter()
            bench.real_step_loss(x.to(device, non_blocking=non_blocking), y.to(device, non_blocking=non_blocking))
    sync(device)
    return args.batch_size * args.steps / (time.perf_counter() - start)


def measure_end_to_end(bench: Bench, images: np.ndarray, labels: np.ndarray, root: Path) -> float:
    """A Lightning fit of the real module on the real loader, timed between batch ends."""
    import pytorch_lightning as pl

    from histossl.train.common import make_trainer

    args, device = bench.args, bench.device
    marks: list[float] = []

    class BatchEnds(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            if batch_idx in (args.warmup - 1, args.warmup + args.steps - 1):
                sync(device)
                marks.append(time.perf_counter())

    data = histossl_loader(bench, images, labels, args.warmup + args.steps)
    trainer = make_trainer(bench.cfg.trainer, 1, [BatchEnds()], root, validate=False)
    trainer.fit(bench.module, data)
    return args.batch_size * args.steps / (marks[1] - marks[0])


# ----------------------------------------------------------------------------------------------
# The conventional pipeline: image files, PIL transforms per image in loader workers


class HEDJitterPIL:
    """Tellez et al. 2018 (arXiv 1808.05896) HED stain jitter on a PIL image, as histopathology
    pipelines usually write it (numpy colour deconvolution per image); same parameters as histossl's."""

    def __init__(self, sigma: float, bias: float) -> None:
        rgb_from_hed = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
        self.rgb_from_hed = rgb_from_hed
        self.hed_from_rgb = np.linalg.inv(rgb_from_hed)
        self.sigma, self.bias = sigma, bias

    def __call__(self, img):
        from PIL import Image

        rgb = np.asarray(img, dtype=np.float32) / 255.0
        density = -np.log(np.maximum(rgb, 1e-6))
        hed = density @ self.hed_from_rgb
        alpha = np.random.uniform(1 - self.sigma, 1 + self.sigma, 3)
        beta = np.random.uniform(-self.bias, self.bias, 3)
        alpha[2], beta[2] = 1.0, 0.0  # DAB untouched
        out = np.exp(-((hed * alpha + beta) @ self.rgb_from_hed))
        return Image.fromarray((np.clip(out, 0, 1) * 255 + 0.5).astype(np.uint8))


class RandomQuarterTurn:
    """0/90/180/270 degrees at random (PIL transpose, exact)."""

    def __call__(self, img):
        from PIL import Image

        k = int(np.random.randint(4))
        return img if k == 0 else img.transpose((Image.Transpose.ROTATE_90, Image.Transpose.ROTATE_180, Image.Transpose.ROTATE_270)[k - 1])


def pil_view(views, size: int):
    """torchvision (v1, PIL) transforms equivalent to histossl's ``random_view`` with ``views``."""
    from torchvision import transforms as T

    from histossl.augment import IMAGENET_MEAN, IMAGENET_STD

    ops: list = []
    if views.crop:
        ops.append(T.RandomResizedCrop(size, scale=(views.crop_scale_min, views.crop_scale_max), ratio=(1 / views.crop_ratio_max, views.crop_ratio_max)))
    else:
        ops.append(T.Resize(size))
        ops.append(T.CenterCrop(size))
    if views.hflip:
        ops.append(T.RandomHorizontalFlip())
    if views.vflip:
        ops.append(T.RandomVerticalFlip())
    if views.rot90:
        ops.append(RandomQuarterTurn())
    if views.hed_jitter_prob > 0:
        ops.append(T.RandomApply([HEDJitterPIL(views.hed_jitter_sigma, views.hed_jitter_bias)], p=views.hed_jitter_prob))
    if views.color_jitter_prob > 0:
        jitter = T.ColorJitter(views.color_jitter_brightness, views.color_jitter_contrast, views.color_jitter_saturation, views.color_jitter_hue)
        ops.append(T.RandomApply([jitter], p=views.color_jitter_prob))
    if views.grayscale_prob > 0:
        ops.append(T.RandomGrayscale(p=views.grayscale_prob))
    if views.blur_prob > 0 and views.blur_sigma_max > 0:
        kernel = 2 * math.ceil(3 * views.blur_sigma_max) + 1
        ops.append(T.RandomApply([T.GaussianBlur(kernel, sigma=(0.1, views.blur_sigma_max))], p=views.blur_prob))
    if views.solarize_prob > 0:
        ops.append(T.RandomSolarize(threshold=128, p=views.solarize_prob))
    ops += [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    return T.Compose(ops)


class ReferenceViews:
    """Per-image transform returning what the method's model sees: one tensor per view spec of the
    method (``view_specs``), or for a rotation task its base view's 4 rotated copies ``(4, 3, S, S)``."""

    def __init__(self, bench: Bench) -> None:
        from histossl.methods.rotnet import RotNet

        if bench.supervised:
            specs = [(bench.views, bench.cfg.image_size)]
        else:
            specs = [(spec.augment, spec.size) for spec in bench.method.view_specs()]
        self.transforms = [pil_view(views, size) for views, size in specs]
        self.rotations = not bench.supervised and isinstance(bench.method, RotNet)

    def __call__(self, img) -> tuple[torch.Tensor, ...]:
        views = tuple(t(img) for t in self.transforms)
        if self.rotations:
            return (torch.stack([torch.rot90(views[0], k, dims=(-2, -1)) for k in range(4)]),)
        return views


class ImageFiles(torch.utils.data.Dataset):
    """torchvision's ImageFolder per item (``default_loader`` = PIL open + RGB), over histossl's index,
    which also reads the grouped ``ROOT/<group>/<class>/`` layout that ImageFolder would take for classes."""

    def __init__(self, paths: list[Path], labels: np.ndarray, transform) -> None:
        self.paths, self.labels, self.transform = paths, labels, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        from torchvision.datasets.folder import default_loader

        return self.transform(default_loader(str(self.paths[i]))), int(self.labels[i])


def reference_loader(bench: Bench, index, batches: int):
    rows = timed_rows(len(index.paths), bench.args.batch_size, batches, bench.args.seed)
    dataset = ImageFiles([index.paths[r] for r in rows], index.labels[rows], ReferenceViews(bench))
    workers = bench.args.reference_workers
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=bench.args.batch_size,
        shuffle=False,  # rows are already a random permutation
        drop_last=True,
        num_workers=workers,
        pin_memory=bench.device.type == "cuda",
        persistent_workers=False,
        prefetch_factor=2 if workers > 0 else None,
    )


def reference_batch(bench: Bench, views: list[torch.Tensor], y: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Loader output (per view ``(B, 3, S, S)``, or ``(B, 4, 3, S, S)`` rotated copies) -> the views the
    model takes (rotated copies rotation-major ``(4B, 3, S, S)``) and the labels."""
    device = bench.device
    views = [v.to(device, non_blocking=True) for v in views]
    views = [v.transpose(0, 1).reshape(-1, *v.shape[2:]) if v.dim() == 5 else v for v in views]
    return views, y.to(device, non_blocking=True)


def measure_reference(bench: Bench, index, with_model: bool) -> float:
    args, device = bench.args, bench.device
    data = reference_loader(bench, index, args.warmup + args.steps)
    optimizer = bench.optimizer() if with_model else None
    autocast = _autocast(bench)
    saved = copy.deepcopy(bench.module.state_dict())  # put back afterwards, as in measure_model_only
    bench.module.train()
    start = 0.0
    for i, (views, y) in enumerate(data):
        if i == args.warmup:
            sync(device)
            start = time.perf_counter()
        x, target = reference_batch(bench, views, y)
        if with_model:
            model_step(bench, optimizer, autocast, x, target)
    sync(device)
    seconds = time.perf_counter() - start
    bench.module.load_state_dict(saved)
    return args.batch_size * args.steps / seconds


# ----------------------------------------------------------------------------------------------
# Main


def load_data(args: argparse.Namespace, cfg) -> tuple:
    """The index and its decoded cache, warmed (every page read once). Returns the cold decode time too."""
    from histossl.data.cache import _cache_key, cache_root, decode_cached  # the key: was the cache cold?
    from histossl.data.sources import load_index

    index = load_index(args.data)
    cold = not (cache_root(cfg.cache_dir) / _cache_key(index, cfg.image_size)).is_dir()
    start = time.perf_counter()
    decoded = decode_cached(index, cfg.image_size, cfg.cache_dir, skip_unreadable=True, progress=False)
    decode_s = time.perf_counter() - start
    start = time.perf_counter()
    np.asarray(decoded.images).sum(dtype=np.uint64)  # read every page: the cache is warm before timing
    warm_s = time.perf_counter() - start
    labels = index.labels[decoded.keep]
    return index, decoded.images, labels, (decode_s if cold else None), warm_s, str(cache_root(cfg.cache_dir))


def versions() -> dict:
    import pytorch_lightning
    import torchvision

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "pytorch_lightning": pytorch_lightning.__version__,
        "numpy": np.__version__,
    }


def machine(device: torch.device) -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "gpu": gpu, "device": str(device)}


def table(result: dict) -> str:
    rows = [
        ("model only (ready-made views)", result["model_only_img_s"]),
        ("histossl end to end (Lightning fit)", result["end_to_end_img_s"]),
        ("reference end to end (PIL + DataLoader)", result["reference_img_s"]),
        ("histossl data path alone", result["data_path_img_s"]),
        ("reference data path alone", result["reference_data_path_img_s"]),
    ]
    lines = [f"{'measurement':<42}{'images/s':>10}", "-" * 52]
    lines += [f"{name:<42}{'-' if v is None else f'{v:.1f}':>10}" for name, v in rows]
    ratios = result["ratios"]
    lines.append("-" * 52)
    for key, value in ratios.items():
        lines.append(f"{key:<42}{'-' if value is None else f'{value:.3f}':>10}")
    return "\n".join(lines)


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.steps < 1 or args.warmup < 1:
        raise SystemExit("--steps and --warmup must be at least 1")
    warnings.filterwarnings("ignore")
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    cfg = build_config(args, cuda)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    load_start = os.getloadavg()
    index, images, labels, decode_s, warm_s, cache = load_data(args, cfg)
    bench = Bench(args, cfg, len(index.classes), device)

    result: dict = dict.fromkeys(KEYS)
    result["data_path_img_s"] = measure_data_path(bench, images, labels)
    result["reference_data_path_img_s"] = measure_reference(bench, index, with_model=False)
    if not args.skip_model:
        # Model only before and after end to end, averaged over time: on a machine whose load drifts
        # during the run, the sandwich cancels a linear drift out of end_to_end / model_only.
        before = measure_model_only(bench, images, labels)
        with tempfile.TemporaryDirectory(prefix="histossl-bench-") as root:
            result["end_to_end_img_s"] = measure_end_to_end(bench, images, labels, Path(root))
        after = measure_model_only(bench, images, labels)
        result["model_only_img_s"] = 2 / (1 / before + 1 / after)
        result["model_only_before_after_img_s"] = [before, after]
        result["reference_img_s"] = measure_reference(bench, index, with_model=True)
    result["ratios"] = {
        "end_to_end / model_only": ratio(result["end_to_end_img_s"], result["model_only_img_s"]),
        "end_to_end / reference": ratio(result["end_to_end_img_s"], result["reference_img_s"]),
        "data_path / reference_data_path": ratio(result["data_path_img_s"], result["reference_data_path_img_s"]),
        # What end_to_end / model_only would be if the data path simply added its own time to the
        # model's (no overlap): a check on the measured ratio that load drift between runs cannot bend.
        "serial bound 1 / (1 + model / data_path)": None
        if result["model_only_img_s"] is None
        else 1 / (1 + result["model_only_img_s"] / result["data_path_img_s"]),
    }
    result.update(
        {
            "method": args.method,
            "backbone": args.backbone,
            "stem": args.stem,
            "image_size": args.image_size,
            "batch_size": args.batch_size,
            "steps": args.steps,
            "warmup": args.warmup,
            "data": str(args.data),
            "n_images": int(len(images)),
            "cold_decode_s": None if decode_s is None else round(decode_s, 3),  # None: the cache existed
            "cache_warm_read_s": round(warm_s, 3),
            "cache_dir": cache,
            "precision": cfg.trainer.precision,
            "channels_last": cfg.trainer.channels_last,
            "compile": cfg.trainer.compile,
            "num_workers": cfg.trainer.num_workers,
            "reference_workers": args.reference_workers,
            "loadavg_start": [round(v, 2) for v in load_start],
            "loadavg_end": [round(v, 2) for v in os.getloadavg()],
            "machine": machine(device),
            "versions": versions(),
            "command": " ".join(["python", "benchmarks/throughput.py", *(sys.argv[1:] if argv is None else argv)]),
        }
    )
    print(table(result))
    decode = "cache already built" if decode_s is None else f"cold decode {decode_s:.2f} s"
    print(f"{len(images)} images, {decode}; load average {load_start[0]:.2f} at start, {os.getloadavg()[0]:.2f} at end")
    if args.json:
        print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
