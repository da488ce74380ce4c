"""How fast are the cheap protocols? The feature store's encode of the target against a bare
``encoder(x)`` loop, then ``linear`` and ``knn`` for every seed x label budget on the stored features.

Reads a finished (or pretrained) study folder: its ``config.yaml``, ``split.csv`` and every
``pretrain/*/encoder.safetensors`` (or the last ``--encoders`` of them). Writes nothing into the
study: features and subsets go to a temporary folder. Prints a markdown table.

    python benchmarks/probe_speed.py out/idc-cpu --seeds 0 1 2 --shots 1 5 10 25
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from histossl import augment, config, features, study  # noqa: E402
from histossl.models.backbones import build_encoder  # noqa: E402
from histossl.train import downstream  # noqa: E402


@torch.no_grad()
def bare_loop(encoder: torch.nn.Module, images: np.ndarray, batch_size: int = 256) -> float:
    """Seconds for ``encoder(x)`` over every image, the batches already in memory as normalised tensors."""
    device = next(encoder.parameters()).device
    batches = [augment.normalize(augment.to_float(torch.from_numpy(np.ascontiguousarray(images[i : i + batch_size])))).to(device)
               for i in range(0, len(images), batch_size)]
    encoder.eval()
    start = time.perf_counter()
    for x in batches:
        encoder(x)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("study", type=Path, help="a study folder with config.yaml and pretrain/*/encoder.safetensors")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--shots", type=int, nargs="*", default=None, help="default: the config's downstream.shots")
    parser.add_argument("--fractions", type=float, nargs="*", default=None, help="default: the config's downstream.fractions")
    parser.add_argument("--encoders", type=int, default=0, help="time only the last N encoder files (0: all)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    out = args.study
    sets = [f"downstream.seeds={args.seeds}", "pretrain.seeds=[]", "trainer.progress=false"]
    if args.shots is not None:
        sets.append(f"downstream.shots={args.shots}")
    if args.fractions is not None:
        sets.append(f"downstream.fractions={args.fractions}")
    cfg = config.load(out / "config.yaml", sets)
    encoder_files = sorted((out / "pretrain").glob("*/encoder.safetensors"))
    if args.encoders:
        encoder_files = encoder_files[-args.encoders :]
    if not encoder_files:
        sys.exit(f"{out}: no pretrain/*/encoder.safetensors")
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        for name in ("split.csv", "split.csv.json"):
            if (out / name).is_file():
                shutil.copy(out / name, tmp / name)
        data, subsets = study.target_data(cfg, study.load_dataset(cfg, cfg.target, out), tmp)
        budgets = {protocol: config.protocol_budgets(cfg, protocol) for protocol in ("linear", "knn")}
        device = features.training_device(cfg)
        print(f"{len(data.labels)} target images at {cfg.image_size} px, {cfg.backbone.name} on {device}; "
              f"{len(args.seeds)} seeds x {len(budgets['linear'])} budgets per protocol\n")
        print("| encoder file | bare encoder(x) s | store encode s | ratio | linear s (runs) | knn s (runs) |")
        print("|---|---|---|---|---|---|")
        totals = {"linear": 0.0, "knn": 0.0}
        for encoder_file in encoder_files:
            encoder = build_encoder(cfg.backbone, str(encoder_file)).to(device)
            bare = bare_loop(encoder, np.asarray(data.images))
            start = time.perf_counter()
            stored = features.features(cfg, encoder_file, data.images, tmp / "features", data.key)
            encode_s = time.perf_counter() - start
            cells = {}
            for protocol in ("linear", "knn"):
                start, n = time.perf_counter(), 0
                for seed in args.seeds:
                    for fraction, shots in budgets[protocol]:
                        spec = downstream.RunSpec(
                            name="bench", encoder="e", method="m", pretrain_chain="", pretrain_dir=None, init=str(encoder_file),
                            protocol=protocol, lr_schedule=None, label_fraction=fraction, shots=shots, seed=seed)
                        downstream.run(cfg, spec, data, subsets[seed][spec.budget], tmp / "runs", stored)
                        n += 1
                cells[protocol] = (time.perf_counter() - start, n)
                totals[protocol] += cells[protocol][0]
            print(f"| `{encoder_file.parent.name}` | {bare:.1f} | {encode_s:.1f} | {encode_s / bare:.2f} | "
                  f"{cells['linear'][0]:.1f} ({cells['linear'][1]}) | {cells['knn'][0]:.1f} ({cells['knn'][1]}) |")
        print(f"\nlinear + knn on every encoder: {totals['linear'] + totals['knn']:.1f} s "
              f"(linear {totals['linear']:.1f} s, knn {totals['knn']:.1f} s)")


if __name__ == "__main__":
    main()
