"""Which pretext method for my data: every registered method at the same wall-clock pretraining budget.

Not the same epochs: a DINO step (two global and several local crops, a teacher) costs more than a
SimCLR step, so equal epochs would favour the expensive methods. The benchmark::

    python benchmarks/methods.py --out out/methods-ebhi [--budget-s 240] [--image-size 64] [--seeds 3]

1. calibrates: for every method of the registry (``histossl.methods.METHODS``, not a list kept here)
   it times ``--calibration-steps`` optimizer steps of the real Lightning pretraining (the study's
   ``PretrainModule``, loader and trainer, on the train split of the data, in this process, after
   ``--warmup-steps`` untimed ones) and one checkpoint save (a stage saves one per epoch); seconds per
   epoch = seconds per step x steps per epoch + checkpoint seconds. Written to
   ``OUT/calibration.json`` with the machine, load, thread count and library versions; a rerun with
   the same data and settings reuses it (only methods missing from it are timed), so the epochs, and
   with them the study, are deterministic and resumable;
2. gives method m ``max(1, floor(budget / seconds_per_epoch(m)))`` epochs and writes the study config
   ``OUT/methods-study.yaml`` (the base config with ``encoders.<m>: {method: m, epochs: E}``);
3. runs that one study in ``OUT`` (``histossl.study.run_study``: pretraining seeds, protocols, label
   budgets, downstream seeds and the supervised baseline from the base config; rerun to resume);
4. writes ``OUT/methods.md``: balanced accuracy, mean ± std over seeds, methods x protocols x budgets,
   the budget and each method's epochs, and the study's verdict lines.

``--calibrate-only`` stops after step 2; ``--table-only`` skips step 3 (methods.md from the runs
recorded so far, marked partial when runs are missing). ``--limit N`` keeps about N cases per class (whole cases, in
sorted order, linked into ``OUT/data-limited``) for a quick run; ``--set KEY=VALUE`` overrides the
base config like the CLI's (``--set downstream.fractions=[0.05,1.0]``).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO / "configs" / "methods-ebhi.yaml"
DEFAULT_DATA = REPO.parent / "shared" / "data" / "ebhi-seg"
CALIBRATION = "calibration.json"
STUDY_CONFIG = "methods-study.yaml"
TABLE = "methods.md"
METRIC = "test_balanced_acc"
log = logging.getLogger("histossl.benchmarks.methods")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="base study config (encoders are filled in)")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="the target image folder")
    p.add_argument("--out", type=Path, default=Path("out") / "methods-ebhi")
    p.add_argument("--budget-s", type=float, default=240.0, help="pretraining wall-clock seconds per method and seed")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--seeds", type=int, default=3, help="pretraining and downstream seeds 0..N-1")
    p.add_argument("--calibration-steps", type=int, default=4, help="timed optimizer steps per method")
    p.add_argument("--warmup-steps", type=int, default=1, help="untimed steps before the timed ones")
    p.add_argument("--limit", type=int, default=0, help="about this many cases per class, for a quick run (0: all)")
    p.add_argument("--methods", nargs="*", default=None, help="a subset of the registered methods (default: all)")
    p.add_argument("--recalibrate", action="store_true", help="time every method again")
    p.add_argument("--calibrate-only", action="store_true", help="stop after writing the study config")
    p.add_argument("--table-only", action="store_true", help="write methods.md from the runs recorded so far (a partial table says so)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    return p.parse_args(argv)


def limited_copy(data: Path, out: Path, per_class: int) -> Path:
    """``out/data-limited``: symbolic links to the images of about ``per_class`` cases of each class.

    Cases (the first folder level) are taken whole in sorted order while one of their classes has
    fewer than ``per_class`` cases, so the run stays grouped like the full data set and every class
    has cases for train, val and test (``per_class`` >= 3).
    """
    target = out / "data-limited"
    counts: dict[str, int] = {}
    for case in sorted(p for p in data.iterdir() if p.is_dir()):
        classes = {c.name: sorted(f for f in c.iterdir() if f.is_file()) for c in sorted(case.iterdir()) if c.is_dir()}
        if not any(counts.get(name, 0) < per_class for name in classes):
            continue
        for name, files in classes.items():
            counts[name] = counts.get(name, 0) + 1
            (target / case.name / name).mkdir(parents=True, exist_ok=True)
            for f in files:
                link = target / case.name / name / f.name
                if not link.exists():
                    link.symlink_to(f.resolve())
    return target


def study_data(args: argparse.Namespace) -> dict:
    """The base config as plain data, with the data, image size, seeds and ``--set`` overrides applied."""
    from histossl import config as config_mod

    data = yaml.safe_load(args.config.read_text()) or {}
    path = limited_copy(args.data, args.out, args.limit) if args.limit else args.data
    seeds = list(range(args.seeds))
    data.setdefault("datasets", {})[data.get("target", "target")] = {
        **(data.get("datasets", {}).get(data.get("target", "target")) or {}), "path": str(path)}
    data["image_size"] = args.image_size
    data.setdefault("pretrain", {})["seeds"] = seeds
    data.setdefault("downstream", {})["seeds"] = seeds
    data["encoders"] = {}
    return config_mod.apply_overrides(data, args.overrides)


def step_timer(warmup: int):
    """A Lightning callback: wall time from the end of the last warm-up batch to the end of the last batch."""
    import pytorch_lightning as pl

    class StepTimer(pl.Callback):
        def __init__(self) -> None:
            self.warmup, self.start, self.end, self.timed, self.losses = warmup, None, None, 0, []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            if batch_idx == 0 and self.warmup == 0:
                self.start = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            now = time.perf_counter()
            loss = outputs["loss"] if isinstance(outputs, dict) else outputs
            self.losses.append(float(loss))
            if batch_idx + 1 == self.warmup:
                self.start = now
            elif batch_idx + 1 > self.warmup:
                self.end, self.timed = now, self.timed + 1

    return StepTimer()


def calibration_key(cfg, n_train: int, steps: int, warmup: int) -> dict:
    """What the seconds per epoch depend on (besides the machine): a rerun with another key recalibrates."""
    from histossl.config import to_dict

    return {
        "data": cfg.datasets[cfg.target].path, "n_train": n_train, "image_size": cfg.image_size,
        "backbone": to_dict(cfg.backbone), "pretrain": {k: v for k, v in to_dict(cfg.pretrain).items() if k not in ("epochs", "seeds")},
        "trainer": to_dict(cfg.trainer), "calibration_steps": steps, "warmup_steps": warmup,
    }


def time_method(cfg, name: str, images: np.ndarray, rows: np.ndarray, steps: int, warmup: int, scratch: Path) -> dict:
    """Seconds per step and per checkpoint of ``name``'s real pretraining, as ``pretrain.run_stage`` builds it."""
    import pytorch_lightning as pl
    import torch

    from histossl.config import EncoderConfig
    from histossl.methods import METHODS, method_settings
    from histossl.models.backbones import build_encoder
    from histossl.train.common import ArrayBatches, loader, make_trainer
    from histossl.train.pretrain import PretrainModule, prepare_encoder

    batch = cfg.pretrain.batch_size
    steps_per_epoch = len(rows) // batch  # the stage's loader drops the last partial batch
    if steps_per_epoch < 1:
        raise SystemExit(f"methods.py: {len(rows)} training images are fewer than pretrain.batch_size={batch}")
    warmup = min(warmup, steps_per_epoch - 1)
    steps = min(steps, steps_per_epoch - warmup)
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    encoder = build_encoder(cfg.backbone, "random")
    prepare_encoder(encoder, cfg)
    method = METHODS.get(name)(encoder, method_settings(cfg, EncoderConfig(method=name)), cfg.pretrain, cfg.image_size)
    module = PretrainModule(method, cfg.pretrain.optim)
    timer = step_timer(warmup)
    trainer = make_trainer(cfg.trainer, 1, [timer], scratch, validate=False, train_batches=warmup + steps)
    data = loader(ArrayBatches(images, rows), batch, shuffle=True, drop_last=True, cfg=cfg.trainer, seed=cfg.seed)
    trainer.fit(module, data)
    step_s = (timer.end - timer.start) / timer.timed
    start = time.perf_counter()  # a stage writes last.ckpt (weights and optimizer state) after every epoch
    trainer.save_checkpoint(scratch / f"{name}.ckpt", weights_only=False)
    checkpoint_s = time.perf_counter() - start
    (scratch / f"{name}.ckpt").unlink()
    return {
        "seconds_per_step": round(step_s, 4), "timed_steps": timer.timed, "warmup_steps": warmup,
        "steps_per_epoch": steps_per_epoch, "checkpoint_s": round(checkpoint_s, 3),
        "seconds_per_epoch": round(step_s * steps_per_epoch + checkpoint_s, 3),
        "losses_finite": all(math.isfinite(x) for x in timer.losses), "losses": [round(x, 4) for x in timer.losses],
        "threads": torch.get_num_threads(),
    }


def calibrate(cfg, out: Path, methods: list[str], steps: int, warmup: int, recalibrate: bool) -> dict:
    """Seconds per epoch of each method on the target's train split, reused from ``OUT/calibration.json`` when it fits."""
    from histossl import provenance, study
    from histossl.config import EncoderConfig
    from histossl.data.splits import load_or_make_split, make_split
    from histossl.errors import ConfigError
    from histossl.methods import METHODS, method_settings

    target = study.load_dataset(cfg, cfg.target, out, write=False)
    # The study's split: read when a run already saved it, else made in memory (deterministic from
    # split.seed) and left for the study to save with its data fingerprint.
    saved = out / "split.csv"
    split = (load_or_make_split(saved, target.index, cfg.split) if saved.is_file()
             else make_split(target.index, cfg.split.val_fraction, cfg.split.test_fraction, cfg.split.seed))[target.decoded.keep]
    rows = np.flatnonzero(split == "train")  # the rows every pretraining stage on the target sees
    for name in methods:  # settings that cannot work on this data (a MoCo queue longer than it) stop here, before any timing
        needed, setting = METHODS.get(name).min_images(method_settings(cfg, EncoderConfig(method=name)), cfg.pretrain)
        if len(rows) < needed:
            raise ConfigError(f"{setting}={needed} is larger than the {len(rows)} training images of data set {cfg.target!r}")
    key = calibration_key(cfg, len(rows), steps, warmup)
    path = out / CALIBRATION
    old = json.loads(path.read_text()) if path.is_file() and not recalibrate else {}
    timed = dict(old.get("methods", {})) if old.get("key") == key else {}
    missing = [m for m in methods if m not in timed]
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="methods-calibration-") as scratch:
        for name in missing:
            log.info("calibrating %s: up to %d timed steps of %d images", name, steps, cfg.pretrain.batch_size)
            timed[name] = time_method(cfg, name, target.decoded.images, rows, steps, warmup, Path(scratch))
            log.info("calibrating %s: %.2f s per step, %.1f s per epoch", name, timed[name]["seconds_per_step"], timed[name]["seconds_per_epoch"])
    if missing or not old:
        old = {
            "key": key, "methods": timed, "machine": provenance.machine(), "versions": provenance.versions(),
            "python": platform.python_version(), "cpu_count": os.cpu_count(),
            "load_average": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
            "calibration_s": round(time.perf_counter() - start, 1),
            "calibrated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
    return old


def with_epochs(data: dict, calibration: dict, methods: list[str], budget_s: float) -> tuple[dict, dict[str, int]]:
    """The study config data with ``encoders.<m>: {method: m, epochs: E}``, E = max(1, floor(budget / s per epoch))."""
    epochs = {m: max(1, math.floor(budget_s / calibration["methods"][m]["seconds_per_epoch"])) for m in methods}
    return {**data, "encoders": {m: {"method": m, "epochs": e} for m, e in epochs.items()}}, epochs


def _budget_label(record: dict) -> str:
    if record.get("shots") is not None:
        return f"{record['shots']} shots"
    return f"{float(record['label_fraction']) * 100:g}%"


def _budget_order(label: str) -> tuple:
    return (0 if "shot" in label else 1, float(label.split()[0].rstrip("%")))


def table(records: list[dict], epochs: dict[str, int], calibration: dict, budget_s: float, verdict: list[str], expected: int) -> str:
    """Markdown: the test table with the verdict, then the same table on the validation cases (the one
    to choose a method by), each one row per encoder, one column per protocol and budget."""
    done = sum(r.get(METRIC) is not None for r in records)
    head = [] if done >= expected else [
        f"**Partial: {done} of {expected} runs recorded** (rerun the command to resume); cells show their n.", ""]
    head += [
        f"Pretraining budget: {budget_s:g} s of wall clock per method and seed (calibrated "
        f"{calibration['calibrated_at']} on {calibration['machine']}, load average {calibration['load_average']}).",
        "",
    ]
    lines = head + grid(records, epochs, calibration, METRIC)
    lines += ["", "Balanced accuracy on the test cases (%), mean ± std over seeds (n runs).", "", "Verdict:", ""]
    lines += [f"- {line}" for line in verdict] or ["- (no comparison: no supervised baseline or no runs)"]
    lines += ["", "The same runs on the validation cases (the selected weights' balanced accuracy, %): the table to",
              "choose a method by, as the test cases must not choose it.", ""]
    lines += grid(records, epochs, calibration, "val_balanced_acc")
    return "\n".join(lines) + "\n"


def grid(records: list[dict], epochs: dict[str, int], calibration: dict, metric: str) -> list[str]:
    """Markdown table lines of ``metric`` (%): encoders x (protocol, budget), mean ± std (n)."""
    from histossl.report import tables

    cells: dict[tuple, list[float]] = {}
    for r in records:
        if r.get(metric) is not None:
            cells.setdefault((r.get("encoder") or r["method"], r["protocol"], _budget_label(r)), []).append(100 * r[metric])
    protocols = sorted({k[1] for k in cells}, key=lambda p: ("linear", "knn", "frozen", "finetune").index(p) if p in ("linear", "knn", "frozen", "finetune") else 9)
    budgets = sorted({k[2] for k in cells}, key=_budget_order)
    rows = [*epochs, *sorted({k[0] for k in cells} - set(epochs))]
    columns = [(p, b) for p in protocols for b in budgets]
    lines = [
        "| encoder | epochs | s/epoch | " + " | ".join(f"{p} {b}" for p, b in columns) + " |",
        "|---|---:|---:|" + "---:|" * len(columns),
    ]
    for name in rows:
        cal = calibration["methods"].get(name)
        row = [name, str(epochs.get(name, "—")), f"{cal['seconds_per_epoch']:.1f}" if cal else "—"]
        for column in columns:
            values = cells.get((name, *column), [])
            row.append(tables.format_points(tables.summarize(values), scale=1) + (f" (n={len(values)})" if values else ""))
        lines.append("| " + " | ".join(row) + " |")
    return lines


def expected_runs(cfg, out: Path) -> int:
    """How many downstream runs the study plans (encoders x pretraining seeds x protocols x budgets x seeds + baselines)."""
    from histossl import config as config_mod, study
    from histossl.train import pretrain

    stages = {name: [pretrain.plan_stages(cfg, entry, seed)[-1] for seed in config_mod.pretrain_seeds(cfg)]
              for name, entry in cfg.encoders.items()}
    return len(study.run_specs(cfg, stages, out))


def verdict_lines(out: Path, records: list[dict]) -> list[str]:
    from histossl import predictions
    from histossl.report import verdict

    def test_predictions(run: str):
        return predictions.read(out / run / predictions.FILE) if run else None

    return verdict.verdict_lines(verdict.compare(records, test_predictions))


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    from histossl import config as config_mod, provenance, study
    from histossl.io import atomic_write_json, atomic_write_text
    from histossl.methods import METHODS
    from histossl.report.records import load_stages

    args.out.mkdir(parents=True, exist_ok=True)
    methods = args.methods or list(METHODS.names())
    for m in methods:
        METHODS.get(m)  # an unknown name fails here, listing the registered ones
    data = study_data(args)
    base = config_mod.from_dict(data)  # validated before any timing
    calibration = calibrate(base, args.out, methods, args.calibration_steps, args.warmup_steps, args.recalibrate)
    data, epochs = with_epochs(data, calibration, methods, args.budget_s)
    calibration = {**calibration, "budget_s": args.budget_s, "epochs": epochs}
    atomic_write_json(args.out / CALIBRATION, calibration)
    unstable = [m for m in methods if not calibration["methods"][m]["losses_finite"]]
    if unstable:
        log.warning("non-finite pretext loss during calibration of %s: lower pretrain.optim.lr", ", ".join(unstable))
    atomic_write_text(args.out / STUDY_CONFIG, yaml.safe_dump(data, sort_keys=False))
    log.info("epochs at %g s each: %s", args.budget_s, ", ".join(f"{m} {e}" for m, e in epochs.items()))
    if args.calibrate_only:
        return args.out / STUDY_CONFIG
    cfg = config_mod.load(args.out / STUDY_CONFIG)
    if not args.table_only:
        study.run_study(cfg, args.out)
    records = [json.loads(line) for line in (args.out / "results.jsonl").read_text().splitlines() if line.strip()]
    text = table(records, epochs, calibration, args.budget_s, verdict_lines(args.out, records), expected_runs(cfg, args.out))
    runs = provenance.load(args.out)
    pretraining = sum(float(stage.info.get("wall_s") or 0) for stage in load_stages(args.out))
    downstream_s = sum(float(r.get("wall_s") or 0) for r in records)
    text += (f"\nCompute: calibration {calibration.get('calibration_s', 0):.0f} s, pretraining {pretraining / 3600:.2f} h, "
             f"downstream {downstream_s / 3600:.2f} h (each stage's and run's own time; {len(runs)} invocation(s), "
             f"{sum(r['wall_s'] is None for r in runs)} without an end: interrupted or running) ({calibration['machine']}; torch {calibration['versions'].get('torch')}, histossl "
             f"{calibration['versions'].get('histossl')}). Command: `python benchmarks/methods.py "
             f"{' '.join(a for a in (argv if argv is not None else sys.argv[1:]) if a != '--table-only')}`\n")
    atomic_write_text(args.out / TABLE, text)
    print(text)
    return args.out / TABLE


if __name__ == "__main__":
    from histossl.cli import quiet_libraries
    from histossl.errors import HistosslError

    quiet_libraries(debug=False, trains=True)
    try:
        print(main())
    except HistosslError as err:
        print(f"methods.py: error: {err}", file=sys.stderr)
        sys.exit(err.exit_code)
