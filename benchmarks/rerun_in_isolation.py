"""Rerun recorded runs of a study, each alone in a fresh study folder, and compare their numbers.

The check behind "a rerun of three cells in isolation reproduces them": each run named is rerun with
the study's own resolved config narrowed to that run alone (its encoder, protocol, lr schedule,
budget, downstream seed and pretraining seed), with ``histossl study``, on the study's own encoder
(its pretraining stages copied without their checkpoints; ``--pretrain`` trains them again from
scratch instead), then its test metrics are printed beside the recorded ones. The same code on the
same CPU should give the same digits; other code or hardware a new draw (compare with the seed spread).

  python benchmarks/rerun_in_isolation.py out/ebhi-cpu RUN [RUN ...] --out out/ebhi-isolation [--pretrain]

RUN is a record's run name as in results.jsonl (``downstream/<name>`` or ``<name>``). Exit status 1
when a rerun differs from its record by more than ``--tolerance`` (balanced accuracy, absolute).
"""

import argparse
import copy
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from histossl import config, records
from histossl.train.pretrain import plan_stages

COMPARED = ["test_balanced_acc", "test_acc", "test_auroc", "test_loss", "n_labeled", "best_epoch", "epochs_run"]


def narrowed(raw: dict, record: dict) -> dict:
    """The study's resolved config (as written to its config.yaml) reduced to the one run of ``record``."""
    cfg = copy.deepcopy(raw)
    d = cfg["downstream"]
    if record["method"] == "supervised":
        cfg["encoders"] = {}
        cfg["pretrain"]["seeds"] = []  # no encoder to pretrain
        d["baselines"] = [record["init"]]
    else:
        entry = {k: v for k, v in raw["encoders"][record["encoder"]].items() if k != "protocols"}  # the run's protocol only, below
        cfg["encoders"] = {record["encoder"]: entry}
        d["baselines"] = []
        cfg["pretrain"]["seeds"] = [record["pretrain_seed"]]  # downstream seed i runs on the i-th listed
    d["protocols"] = [record["protocol"]]
    if record.get("lr_schedule"):
        d["lr_schedules"] = [record["lr_schedule"]]
    d["fractions"] = [] if record["label_fraction"] is None else [record["label_fraction"]]
    d["shots"] = [] if record["shots"] is None else [record["shots"]]
    d["budgets_of"] = {}
    d["seeds"] = [record["seed"]]
    return cfg


def copy_stages(study: Path, cfg: config.Config, record: dict, dest: Path) -> None:
    """The pretraining stages of the record's encoder (every stage of its chain), without checkpoints."""
    if record["method"] == "supervised":
        return
    for stage in plan_stages(cfg, cfg.encoders[record["encoder"]], record["pretrain_seed"]):
        source = study / "pretrain" / stage.folder
        if not (source / "encoder.safetensors").is_file():
            sys.exit(f"{source}: no encoder.safetensors to reuse (published folders hold none); rerun with --pretrain")
        shutil.copytree(source, dest / "pretrain" / stage.folder, ignore=shutil.ignore_patterns("checkpoints"), dirs_exist_ok=True)


def rerun(study: Path, recorded: dict[str, dict], raw: dict, name: str, out: Path, pretrain: bool) -> tuple[dict, dict]:
    """Rerun one recorded run alone; returns (recorded, rerun) records."""
    name = name.removeprefix("downstream/")
    if name not in recorded:
        sys.exit(f"{study / 'results.jsonl'}: no run named {name!r}")
    record = recorded[name]
    config_file = out / f"{name}.yaml"
    folder = out / name
    folder.mkdir(parents=True, exist_ok=True)
    config_file.write_text(yaml.safe_dump(narrowed(raw, record), sort_keys=False))
    if not pretrain:
        copy_stages(study, config.load(config_file), record, folder)
    log = out / f"{name}.log"
    with log.open("w") as stream:  # the study's own output stays out of the comparison on stdout
        done = subprocess.run([sys.executable, "-m", "histossl", "study", str(config_file), "--out", str(folder)],
                              stdout=stream, stderr=subprocess.STDOUT)
    if done.returncode:
        sys.exit(f"{folder}: the rerun failed (exit {done.returncode}); its output is in {log}")
    again = {r["run"].removeprefix("downstream/"): r for r in records.read_dicts(folder)[0]}
    if name not in again:
        sys.exit(f"{folder}: the rerun recorded {sorted(again)}, not {name!r} (the config no longer makes that run)")
    return record, again[name]


def table(pairs: list[tuple[str, dict, dict]]) -> str:
    lines = ["| run | field | recorded | rerun | difference |", "|---|---|---:|---:|---:|"]
    for name, before, after in pairs:
        for field in COMPARED:
            a, b = before.get(field), after.get(field)
            diff = "—" if not isinstance(a, (int, float)) or not isinstance(b, (int, float)) else f"{b - a:+.2g}"
            lines.append(f"| {name} | {field} | {a} | {b} | {diff} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("study", type=Path, help="a study folder (results.jsonl, config.yaml, pretrain/)")
    parser.add_argument("runs", nargs="+", help="run names from results.jsonl")
    parser.add_argument("--out", type=Path, required=True, help="one fresh study folder per run goes here")
    parser.add_argument("--pretrain", action="store_true", help="train the encoders again instead of copying them")
    parser.add_argument("--tolerance", type=float, default=0.0, help="largest accepted |difference| of test_balanced_acc")
    args = parser.parse_args(argv)
    recorded = {r["run"].removeprefix("downstream/"): r for r in records.read_dicts(args.study)[0]}
    raw = yaml.safe_load((args.study / "config.yaml").read_text())
    pairs = [(name.removeprefix("downstream/"), *rerun(args.study, recorded, raw, name, args.out, args.pretrain)) for name in args.runs]
    print(table(pairs))
    for name, before, after in pairs:
        if before.get("histossl_version") != after.get("histossl_version"):
            print(f"note: {name} was recorded by histossl {before.get('histossl_version')}, rerun by {after.get('histossl_version')}")
    worst = max(abs(after["test_balanced_acc"] - before["test_balanced_acc"]) for _, before, after in pairs)
    print(f"largest |difference| of test_balanced_acc: {worst:.6f} (tolerance {args.tolerance})")
    return int(worst > args.tolerance)


if __name__ == "__main__":
    raise SystemExit(main())
