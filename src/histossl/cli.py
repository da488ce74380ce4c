"""The ``histossl`` command: parses arguments, then calls one function per command.

Errors a user can act on (HistosslError) print one line naming the culprit and exit with 2
(usage, config) or 1 (anything else); ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import logging
import pickle
import sys
import warnings
from pathlib import Path

from histossl import __version__
from histossl.errors import HistosslError

log = logging.getLogger("histossl")
QUICKSTART = Path(__file__).resolve().parent / "quickstart.yaml"


def _config_args(p: argparse.ArgumentParser, config: bool = True, out: str = "out/<name>") -> None:
    if config:
        p.add_argument("config", type=Path, help="study config (YAML)")
    p.add_argument("--out", type=Path, help=f"output folder (default: {out})")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set pretrain.epochs=5 (repeatable)")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="histossl", description="Self-supervised pretraining studies for histopathology with scarce labels.")
    p.add_argument("--version", action="version", version=f"histossl {__version__}")
    p.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    init = sub.add_parser("init", help="write a commented study config fitted to a data set, to start from")
    init.add_argument("data", type=Path, help="image folder or CSV manifest")
    init.add_argument("--out", type=Path, default=Path("study.yaml"), help="config file to write (default: study.yaml)")
    demo = sub.add_parser("demo", help="the quickstart study on the embedded synthetic tissue data")
    _config_args(demo, config=False, out="out/demo")
    study = sub.add_parser("study", help="pretraining, downstream runs and the report; rerun to resume")
    _config_args(study)
    pre = sub.add_parser("pretrain", help="pretraining only; writes each encoder")
    _config_args(pre)
    ev = sub.add_parser("evaluate", help="downstream runs for one encoder file")
    _config_args(ev)
    ev.add_argument("--encoder", type=Path, required=True, help="encoder weights (.safetensors, .pth, .pt)")
    rep = sub.add_parser("report", help="rebuild report.md, report.html and figures/ from a study's records")
    rep.add_argument("dir", type=Path)
    cmp = sub.add_parser("compare", help="two studies on the same split and subsets: paired differences cell by cell")
    cmp.add_argument("dir_a", type=Path, metavar="DIR_A")
    cmp.add_argument("dir_b", type=Path, metavar="DIR_B")
    cmp.add_argument("--out", type=Path, help="write the markdown table to this file (default: standard output)")
    cmp.add_argument("--metric", default="test_balanced_acc", help="record field to compare (default: test_balanced_acc)")

    data = sub.add_parser("data", help="data sets: synth, inspect, tile").add_subparsers(dest="data_command", required=True, metavar="SUBCOMMAND")
    synth = data.add_parser("synth", help="write the synthetic tissue data set as a group/class image folder")
    synth.add_argument("--out", type=Path, required=True)
    synth.add_argument("--classes", help="comma-separated tissue classes (default: all)")
    synth.add_argument("--groups", type=int, help="number of simulated slides")
    synth.add_argument("--per-class", type=int, help="images per class and slide")
    synth.add_argument("--size", type=int, help="image size in pixels")
    synth.add_argument("--seed", type=int)
    synth.add_argument("--grid", type=Path, help="also draw a grid of samples into this PNG")
    inspect = data.add_parser("inspect", help="classes, counts, groups, sizes, modes, unreadable files")
    inspect.add_argument("path", type=Path)
    inspect.add_argument("--json", action="store_true")
    inspect.add_argument("--unlabelled", action="store_true", help="an unlabelled pool (labels: false): images at any depth")
    inspect.add_argument("--stain-reference", type=Path, metavar="IMAGE",
                         help="also show this reference image's Macenko stain matrix and Reinhard statistics")
    tile = data.add_parser("tile", help="tissue patches from whole-slide images, one folder per slide, and a manifest")
    tile.add_argument("slides", type=Path, metavar="SLIDE_OR_FOLDER")
    tile.add_argument("--out", type=Path, required=True)
    tile.add_argument("--patch-size", type=int, default=224, help="patch side in pixels (default 224)")
    resolution = tile.add_mutually_exclusive_group()
    resolution.add_argument("--mpp", type=float, help="microns per pixel of the patches (default 0.5, about 20x)")
    resolution.add_argument("--magnification", type=float, help="objective magnification of the patches, e.g. 20")
    tile.add_argument("--slide-mpp", type=float, help="microns per pixel of level 0, for slides whose metadata lacks it")
    tile.add_argument("--tissue-fraction", type=float, default=0.5, help="keep patches with at least this tissue fraction (default 0.5)")
    tile.add_argument("--labels", type=Path, metavar="CSV", help="CSV slide,label: patches go to DIR/<slide>/<label>/")
    tile.add_argument("--workers", type=int, default=0, help="slides tiled in parallel, one process each (default: CPU cores)")

    weights = sub.add_parser("weights", help="ImageNet weights").add_subparsers(dest="weights_command", required=True, metavar="SUBCOMMAND")
    wpath = weights.add_parser("path", help="where the ImageNet weights of a backbone are expected")
    wpath.add_argument("backbone")
    return p


def _load(args) -> tuple:
    from histossl import config

    cfg = config.load(args.config, args.overrides)
    out = args.out or Path("out") / cfg.name
    return cfg, out


def cmd_init(args) -> None:
    from histossl.init_config import write_init

    path = write_init(args.data, args.out)
    print(f"config: {path}\nnext: histossl study {path}")


def cmd_demo(args) -> None:
    from histossl import config, study

    cfg = config.load(QUICKSTART, args.overrides)
    out = args.out or Path("out") / "demo"
    report = study.run_study(cfg, out)
    print(f"report: {report}")


def cmd_study(args) -> None:
    from histossl import study

    from histossl import ranks

    cfg, out = _load(args)
    path = study.run_study(cfg, out)
    if ranks.is_owner():  # the other ranks of a multi-process run stay quiet
        print(f"{'report' if path.suffix == '.md' else 'results'}: {path}")


def cmd_pretrain(args) -> None:
    from histossl import study

    cfg, out = _load(args)
    if not cfg.encoders:
        raise HistosslError(f"{args.config}: no encoders to pretrain (add an 'encoders:' section)")
    for name, paths in study.run_pretrain(cfg, out).items():
        for path in paths:
            print(f"{name}: {path}")


def cmd_evaluate(args) -> None:
    from histossl import study

    from histossl import ranks

    cfg, out = _load(args)
    path = study.run_evaluate(cfg, out, args.encoder)
    if ranks.is_owner():
        print(f"report: {path}")


def cmd_report(args) -> None:
    from histossl.report import build_report

    if not (args.dir / "results.jsonl").is_file():
        raise HistosslError(f"{args.dir}: no results.jsonl (is this a study's output folder?)")
    print(f"report: {build_report(args.dir)}")


def cmd_compare(args) -> None:
    from histossl.io import atomic_write_text
    from histossl.report.compare import compare_studies

    text = compare_studies(args.dir_a, args.dir_b, args.metric)
    if args.out:
        atomic_write_text(args.out, text)
        print(f"comparison: {args.out}")
    else:
        print(text, end="")


def cmd_data(args) -> None:
    if args.data_command == "inspect":
        from histossl.data.inspect import format_inspect, inspect_path

        report = inspect_path(args.path, labels=not args.unlabelled, stain_reference=args.stain_reference)
        print(json.dumps(report, indent=2) if args.json else format_inspect(report))
        return
    if args.data_command == "tile":
        from histossl.data.tile import TileSettings, tile_slides

        settings = TileSettings.from_args(args.patch_size, args.mpp, args.magnification, args.slide_mpp, args.tissue_fraction)
        manifest = tile_slides(args.slides, args.out, settings, labels_csv=args.labels, workers=args.workers)
        print(f"manifest: {manifest}")
        return
    import dataclasses

    from histossl.config import SynthConfig
    from histossl.data.synth import draw_grid, synthesize

    options = {
        "classes": args.classes.split(",") if args.classes else None,
        "n_groups": args.groups,
        "per_class_per_group": args.per_class,
        "image_size": args.size,
        "seed": args.seed,
    }
    cfg = dataclasses.replace(SynthConfig(), **{k: v for k, v in options.items() if v is not None})
    root = synthesize(args.out, cfg, progress=True)
    print(f"synthetic data: {root}")
    if args.grid:
        print(f"sample grid: {draw_grid(root, args.grid)}")


def cmd_weights(args) -> None:
    from histossl.models.backbones import imagenet_weights_path

    print(imagenet_weights_path(args.backbone))


COMMANDS = {
    "init": cmd_init,
    "demo": cmd_demo,
    "study": cmd_study,
    "pretrain": cmd_pretrain,
    "evaluate": cmd_evaluate,
    "report": cmd_report,
    "compare": cmd_compare,
    "data": cmd_data,
    "weights": cmd_weights,
}


class _QuietLibraries(logging.Filter):
    """Drops Lightning's info banners (GPU available: False, tips, ...) unless --debug is given."""

    NAMES = ("pytorch_lightning", "lightning", "lightning_fabric", "lightly")

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or not record.name.startswith(self.NAMES)


def quiet_libraries(debug: bool, trains: bool) -> None:
    """Our log lines on stderr with a time stamp; library chatter only with --debug.

    Lightning installs its own handler and level when imported, so the filter sits on every handler
    (ours and, once imported, Lightning's) rather than on a logger level that its import resets.
    """
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    from histossl import ranks

    # The other ranks of a multi-process run repeat rank 0's progress lines; they show only warnings.
    logging.getLogger("histossl").setLevel(logging.DEBUG if debug else logging.INFO if ranks.is_owner() else logging.WARNING)
    if debug:
        return
    for handler in logging.getLogger().handlers:
        handler.addFilter(_QuietLibraries())
    if not trains:
        return
    import pytorch_lightning  # noqa: F401 - so that its handler exists and can be filtered too

    for name in ("pytorch_lightning", "lightning_fabric"):
        for handler in logging.getLogger(name).handlers:
            handler.addFilter(_QuietLibraries())
    warnings.filterwarnings("ignore", module="pytorch_lightning")
    warnings.filterwarnings("ignore", module="lightning_fabric")
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from histossl import provenance

    provenance.set_command(sys.argv[1:] if argv is None else argv)
    trains = args.command in ("demo", "study", "pretrain", "evaluate")
    quiet_libraries(args.debug, trains=trains)
    if trains:
        from histossl.train.common import catch_interrupts

        catch_interrupts()
    try:
        COMMANDS[args.command](args)
    except HistosslError as err:
        if args.debug:
            raise
        print(f"histossl: error: {err}", file=sys.stderr)
        return err.exit_code
    except OSError as err:  # disk full, read-only or vanished files, wherever a library hit them
        if args.debug:
            raise
        where = f"{err.filename}: " if err.filename else ""
        print(f"histossl: error: {where}{err.strerror or err}; finished work is kept, rerun to resume", file=sys.stderr)
        return 1
    except pickle.UnpicklingError as err:  # a checkpoint carrying code, refused by weights_only loading
        if args.debug:
            raise
        reason = next((line.strip() for line in str(err).splitlines() if "GLOBAL" in line or "global" in line), "")
        print(f"histossl: error: refused to load a checkpoint or weights file that holds code or unsupported types"
              f"{f' ({reason})' if reason else ''}; delete it to start that stage or run afresh", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("histossl: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    return 0
