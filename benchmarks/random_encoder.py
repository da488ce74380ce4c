"""A randomly initialised encoder file: the floor a pretrained encoder's frozen features must beat.

    python benchmarks/random_encoder.py out/random-resnet18.safetensors [--backbone resnet18] [--seed 0]
    histossl evaluate configs/methods-ebhi.yaml --encoder out/random-resnet18.safetensors \
        --out out/random-ebhi --set 'downstream.protocols=[linear,knn]' --set 'downstream.baselines=[]'
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from histossl.config import BackboneConfig  # noqa: E402
from histossl.models.backbones import build_encoder, save_encoder  # noqa: E402

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path)
    p.add_argument("--backbone", default="resnet18")
    p.add_argument("--stem", default="standard", choices=("standard", "small"))
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.manual_seed(args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_encoder(build_encoder(BackboneConfig(name=args.backbone, stem=args.stem), "random"), args.out)
    print(args.out)
