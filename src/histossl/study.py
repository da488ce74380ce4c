"""A study: every pretraining stage, then every downstream run, then the report.

Reruns resume: finished stages are reused (their folder name hashes what shaped them), runs already
in ``results.jsonl`` are skipped, and an interrupted stage or run continues from its last epoch.
One study process per output folder at a time (an ``flock`` that dies with its process).
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import itertools
import json
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from histossl import config as config_mod
from histossl import features, pace, preflight, provenance, ranks, records, stale
from histossl.config import Config
from histossl.data.cache import DecodedImages, cache_key, decode_cached
from histossl.data.sources import ImageIndex, load_index
from histossl.data.splits import label_subsets, labels_per_class, load_or_make_split, make_split, shot_subsets
from histossl.data.synth import synthesize
from histossl.errors import ConfigError, DataError, Diverged, HistosslError
from histossl.io import atomic_write_json, atomic_write_text
from histossl.models.backbones import imagenet_weights_path
from histossl.train import downstream, pretrain

log = logging.getLogger(__name__)
RESULTS = "results.jsonl"
PLAN = "plan.json"  # the downstream runs the last study command planned


@contextmanager
def study_lock(out: Path) -> Iterator[None]:
    """Refuse a second process on the same output folder; the OS drops the lock if we are killed."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        handle = open(out / ".lock", "a+")
    except OSError as err:
        raise HistosslError(f"cannot write to output folder {out}: {err.strerror}") from None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        other = handle.read().strip() or "another process"
        handle.close()
        raise HistosslError(f"{out} is in use by {other}; wait for it to finish or use another --out") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"histossl pid {os.getpid()}")
    handle.flush()
    try:
        yield
    finally:
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()


def write_config(cfg: Config, out: Path) -> None:
    """Save the resolved config, unless the folder already holds work made with its ``config.yaml``.

    Call ``check_config`` (and the other checks) first: a config is written only once it is known to run.
    Hardware settings (``trainer``) and ``name`` may differ when a study is resumed elsewhere; the
    config.yaml that made the recorded work is kept then (each command's own line is in invocations.jsonl).
    A config that only adds protocols, fractions or shots replaces it: it describes all the work.
    """
    path = out / "config.yaml"
    if path.is_file() and _has_work(out):
        new, old = config_mod.to_dict(cfg), _old_config(path)
        hardware = ("trainer", "name")
        grown = _accept_added_budgets_and_protocols(old, new)
        if old and grown != old and all(grown.get(k) == new.get(k) for k in new if k not in hardware):
            config_mod.save(cfg, path)  # only protocols or budgets added: the recorded work stays valid
            return
        if new != old:
            log.info("%s kept: it made the work already in %s (this command's settings are in %s)", path, out, provenance.INVOCATIONS)
        return
    config_mod.save(cfg, path)


def _has_work(out: Path) -> bool:
    """Whether a downstream run was recorded or a pretraining stage finished in ``out``."""
    return bool(records.load(out / RESULTS, repair=False)) or any((out / "pretrain").glob("*/stage.json"))


def _old_config(path: Path) -> dict:
    try:
        old = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        return config_mod.to_dict(config_mod.from_written(old))
    except (yaml.YAMLError, UnicodeDecodeError, HistosslError, AttributeError, TypeError):
        return {}


def check_config(cfg: Config, out: Path) -> None:
    """Refuse to mix records of a different study into one folder (compares with ``out/config.yaml``)."""
    path = out / "config.yaml"
    new = config_mod.to_dict(cfg)
    if path.is_file():
        try:
            old = yaml.safe_load(path.read_text()) or {}
        except (yaml.YAMLError, UnicodeDecodeError) as err:
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise ConfigError(f"{path}: not a config written by histossl ({reason}); choose another --out") from None
        if not isinstance(old, dict):
            raise ConfigError(f"{path}: not a config written by histossl; choose another --out")
        try:  # a key added to histossl since that study was made compares as its default
            old = config_mod.to_dict(config_mod.from_written(old))
        except ConfigError:
            pass  # compared as written: the first difference names the key
        old = _accept_added_budgets_and_protocols(old, new)
        hardware = ("trainer", "name")
        diff = _first_difference({k: v for k, v in old.items() if k not in hardware}, {k: v for k, v in new.items() if k not in hardware})
        if diff:
            raise ConfigError(
                f"{out} holds a study made with another config (first difference at {diff}); "
                "rerun with the same config to resume, or choose another --out"
            )


def _accept_added_budgets_and_protocols(old: dict, new: dict) -> dict:
    """``old`` with the new protocols, fractions, shots and ``budgets_of`` when the new config only adds runs.

    Adding ``linear`` and ``knn`` (or a 5-shot budget, or a budget to fine-tuning's ``budgets_of``) to a
    finished study adds runs and leaves every recorded run valid, so it resumes the study instead of
    refusing it.
    """
    try:
        o, n = old["downstream"], new["downstream"]
        before, after = config_mod.from_dict(old), config_mod.from_dict(new)
        old_protocols = config_mod.downstream_protocols(before)
        grows = set(old_protocols) <= set(config_mod.downstream_protocols(after)) and all(
            set(config_mod.protocol_budgets(before, p)) <= set(config_mod.protocol_budgets(after, p))
            for p in {*old_protocols, config_mod.BASELINES})
    except (KeyError, TypeError, AttributeError, ConfigError):
        return old
    if not grows:
        return old
    keys = ("protocols", "modes", "fractions", "shots", "budgets_of")
    return {**old, "downstream": {**o, **{k: n[k] for k in keys if k in n}}}


def _first_difference(a, b, key: str = "") -> str | None:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in list(a) + [k for k in b if k not in a]:
            sub = f"{key}.{k}" if key else str(k)
            if k not in a or k not in b:
                return sub
            found = _first_difference(a[k], b[k], sub)
            if found:
                return found
        return None
    return None if a == b else f"{key}: {a!r} -> {b!r}"


@dataclass
class Dataset:
    name: str
    index: ImageIndex
    decoded: DecodedImages


def dataset_path(cfg: Config, name: str, out: Path) -> Path:
    ds = cfg.datasets[name]
    if ds.synthetic:
        return synthesize(out / "data" / name, cfg.synth)
    return Path(ds.path).expanduser()


def load_dataset(cfg: Config, name: str, out: Path, write: bool = True) -> Dataset:
    """Index and decode one data set (once: the decoded cache is reused across runs and studies).

    ``write=False`` (the checks before work starts) leaves the list of skipped images unwritten.
    """
    ds = cfg.datasets[name]
    index = load_index(dataset_path(cfg, name, out), labels=ds.labels)
    decoded = decode_cached(
        index, cfg.image_size, cfg.cache_dir, ds.skip_unreadable, progress=cfg.trainer.progress,
        stain_normalization=ds.stain_normalization,
    )
    if ds.stain_normalization is not None:
        log.info("data set %s: %s stain normalisation to %s; %d images kept unnormalised (background or a single colour)",
                 name, ds.stain_normalization.method, ds.stain_normalization.reference, decoded.stain_fallbacks)
    if decoded.skipped and write and ranks.is_owner():
        log.warning("data set %s: skipped %d unreadable images (listed in %s)", name, len(decoded.skipped), f"skipped_{name}.txt")
        atomic_write_text(out / f"skipped_{name}.txt", "".join(f"{p}\t{why}\n" for p, why in decoded.skipped))
    return Dataset(name, index, decoded)


def split_of(cfg: Config, out: Path, index: ImageIndex) -> np.ndarray:
    """The target's split (``split.csv``, made once); a new one keeps the data fingerprint it was made from."""
    path = out / "split.csv"
    if not ranks.is_owner():  # rank 0 wrote it before the first fit; the split is deterministic in any case
        return load_or_make_split(path, index, cfg.split) if path.is_file() else make_split(
            index, cfg.split.val_fraction, cfg.split.test_fraction, cfg.split.seed)
    made = not path.is_file()
    split = load_or_make_split(path, index, cfg.split)
    target_print = stale.current(out).get(cfg.target)
    if made and target_print:
        settings = path.with_name(path.name + ".json")
        atomic_write_json(settings, {**json.loads(settings.read_text()), "data": target_print})
    return split


def target_data(cfg: Config, target: Dataset, out: Path) -> tuple[downstream.TargetData, dict[int, dict]]:
    """The split (saved as split.csv, reused on every rerun) and the labelled subsets of each seed.

    The subsets of a seed are keyed by budget: the fraction (a float), or ``("shots", k)``; they are
    written to ``subsets.json`` with the labelled images per class. A protocol that chooses on
    validation with an empty val split, or more shots than a class has training images, is a
    ConfigError here, before any run.
    """
    from histossl.protocols import PROTOCOLS

    split = split_of(cfg, out, target.index)
    keep = target.decoded.keep
    labels = target.index.labels[keep]
    split_rows = split[keep]
    rows = {name: np.flatnonzero(split_rows == name) for name in ("train", "val", "test")}
    if len(rows["val"]) == 0:
        for name in config_mod.downstream_protocols(cfg):
            if PROTOCOLS.get(name).needs_validation:
                raise ConfigError(f"downstream.protocols: {name!r} chooses on the validation split, and the val split "
                                  f"of data set {cfg.target!r} is empty; give the manifest val rows")
    for name, r in rows.items():
        if len(r) == 0:
            raise DataError(f"the {name} split of data set {cfg.target!r} is empty; check split.* or the manifest's split column")
    paths = [str(p.relative_to(target.index.root)) if p.is_relative_to(target.index.root) else str(p) for p in target.index.paths]
    classes = target.index.classes
    key = hashlib.sha256(f"{cache_key(target.index, cfg.image_size, cfg.datasets[cfg.target].stain_normalization)}\n{cfg.image_size}\n{len(keep)}".encode()).hexdigest()[:16]
    data = downstream.TargetData(target.decoded.images, labels, classes, rows["train"], rows["val"], rows["test"], key,
                                 paths=[paths[i] for i in keep], groups=target.index.groups[keep])
    # Seed s draws subset s: every method and protocol sees the same labelled images for the same seed.
    subsets: dict[int, dict] = {}
    for seed in cfg.downstream.seeds:
        subsets[seed] = dict(label_subsets(labels, rows["train"], cfg.downstream.fractions, seed))
        for k, idx in shot_subsets(labels, rows["train"], cfg.downstream.shots, seed, classes).items():
            subsets[seed][("shots", k)] = idx

    if not ranks.is_owner():  # rank 0 writes subsets.json
        return data, subsets

    def name(budget) -> str:
        return f"{budget[1]}-shot" if isinstance(budget, tuple) else str(budget)

    atomic_write_json(
        out / "subsets.json",
        {
            str(seed): {
                name(b): {"n": int(len(idx)), "per_class": labels_per_class(labels, idx, len(classes)), "paths": [paths[keep[i]] for i in idx]}
                for b, idx in by_budget.items()
            }
            for seed, by_budget in subsets.items()
        },
    )
    return data, subsets


def plan_encoders(cfg: Config, names: list[str] | None = None) -> dict[str, list[list[pretrain.Stage]]]:
    """Per encoder entry (or per entry of ``names``), its stages for each pretraining seed, in seed order."""
    entries = {n: e for n, e in cfg.encoders.items() if names is None or n in names}
    return {
        name: [pretrain.plan_stages(cfg, entry, seed) for seed in config_mod.pretrain_seeds(cfg)]
        for name, entry in entries.items()
    }


def last_stages(plans: dict[str, list[list[pretrain.Stage]]]) -> dict[str, list[pretrain.Stage]]:
    """Per entry, the stage that makes its encoder, one per pretraining seed."""
    return {name: [stages[-1] for stages in per_seed] for name, per_seed in plans.items()}


def pretrain_all(
    cfg: Config, out: Path, names: list[str] | None = None, needed: set[str] | None = None
) -> dict[str, list[pretrain.Stage]]:
    """Run every stage of every encoder entry (or of ``names``) for every pretraining seed.

    ``needed``: the folders of the encoders some run still needs; an encoder outside it is not
    (re)made (a study restored from its published records retrains only what its missing runs use).
    Returns, per entry, its last stage for each pretraining seed, in the order of the seeds.
    """
    plans = plan_encoders(cfg, names)
    loaded: dict[str, Dataset] = {}
    splits: dict[str, np.ndarray] = {}
    for name, per_seed in plans.items():
        wanted = [stages for stages in per_seed if needed is None or stages[-1].folder in needed]
        for stage in (s for stages in wanted for s in stages):
            if pretrain.stage_done(out / "pretrain" / stage.folder):
                continue
            if stage.dataset not in loaded:
                loaded[stage.dataset] = load_dataset(cfg, stage.dataset, out)
            ds = loaded[stage.dataset]
            rows = np.arange(len(ds.decoded.keep))  # a data set other than the target: every image (labelled or not)
            if stage.dataset == cfg.target:  # pretext training never sees the val or test patients
                if cfg.target not in splits:
                    splits[cfg.target] = split_of(cfg, out, ds.index)[ds.decoded.keep]
                rows = np.flatnonzero(splits[cfg.target] == "train")
            log.info(
                "pretrain %s: stage %s, seed %d (%s on %s, %d images, %d epochs)",
                name, stage.chain, stage.seed, stage.method, stage.dataset, len(rows), stage.epochs,
            )
            try:
                pretrain.run_stage(cfg, stage, ds.decoded.images, rows, out / "pretrain", name, stale.current(out).get(stage.dataset))
            except Diverged as err:
                raise HistosslError(
                    f"pretraining stage {stage.folder} diverged ({err}); lower pretrain.optim.lr "
                    f"(now {cfg.pretrain.optim.lr:g}) and rerun"
                ) from None
    return last_stages(plans)


def unrecorded_encoders(specs: list[downstream.RunSpec], out: Path) -> set[str]:
    """The pretraining folders of the encoders that runs not yet in results.jsonl read."""
    done = records.finished_runs(out / RESULTS, repair=False)
    return {Path(s.pretrain_dir).name for s in specs if s.pretrain_dir and f"downstream/{s.name}" not in done}


def _run_name(encoder: str, protocol: str, schedule: str | None, fraction: float | None, shots: int | None, seed: int) -> str:
    budget = f"f{fraction:g}" if shots is None else f"k{shots}"
    return "__".join([encoder, protocol, *([schedule] if schedule else []), budget, f"s{seed}"])


def run_specs(cfg: Config, encoders: dict[str, list[pretrain.Stage]], out: Path) -> list[downstream.RunSpec]:
    """Encoders x protocols (x lr schedules, where the protocol has one) x budgets x seeds, and the baselines.

    Each protocol runs at its budgets (``config.protocol_budgets``); the baselines at theirs (``config.BASELINES``).
    Downstream seed i runs on the encoder of pretraining seed i mod n (``encoders`` lists one stage per
    pretraining seed); a run on a pretraining seed other than the study seed has ``__p<seed>`` in its name.
    The supervised baselines are finetune runs, for every schedule, fine-tuning budget and seed.
    """
    from histossl.protocols import PROTOCOLS

    d = cfg.downstream
    specs = []
    for name, stages in encoders.items():
        for protocol in config_mod.encoder_protocols(cfg, cfg.encoders.get(name, config_mod.EncoderConfig())):
            schedules = d.lr_schedules if PROTOCOLS.get(protocol).uses_lr_schedule else [None]
            budgets = config_mod.protocol_budgets(cfg, protocol)
            for schedule, (fraction, shots), seed in itertools.product(schedules, budgets, d.seeds):
                stage = stages[d.seeds.index(seed) % len(stages)]
                suffix = "" if stage.seed == cfg.seed else f"__p{stage.seed}"
                specs.append(
                    downstream.RunSpec(
                        name=_run_name(name, protocol, schedule, fraction, shots, seed) + suffix,
                        encoder=name,
                        method=stage.method,
                        pretrain_chain=stage.chain,
                        pretrain_dir=f"pretrain/{stage.folder}",
                        init=str(out / "pretrain" / stage.folder / "encoder.safetensors"),
                        protocol=protocol,
                        lr_schedule=schedule,
                        label_fraction=fraction,
                        shots=shots,
                        seed=seed,
                        pretrain_seed=stage.seed,
                    )
                )
    for init in d.baselines:
        if init == "imagenet" and not imagenet_weights_path(cfg.backbone.name).is_file():
            log.warning("supervised baseline from imagenet skipped: no weights at %s", imagenet_weights_path(cfg.backbone.name))
            continue
        name = "supervised" if init == "random" else f"supervised_{pretrain.init_label(init)}"
        budgets = config_mod.protocol_budgets(cfg, config_mod.BASELINES)
        for schedule, (fraction, shots), seed in itertools.product(d.lr_schedules, budgets, d.seeds):
            specs.append(
                downstream.RunSpec(
                    name=_run_name(name, "finetune", schedule, fraction, shots, seed),
                    encoder=name,
                    method="supervised",
                    pretrain_chain="none" if init == "random" else pretrain.init_label(init),
                    pretrain_dir=None,
                    init=init,
                    protocol="finetune",
                    lr_schedule=schedule,
                    label_fraction=fraction,
                    shots=shots,
                    seed=seed,
                )
            )
    # Label-scarce budgets first (shots, then fractions, each ascending): a study stopped part-way has
    # its smallest budgets complete, every encoder and the baseline with all their seeds.
    return sorted(specs, key=lambda s: (s.shots is None, s.shots or 0, s.label_fraction or 0.0))


def in_run_order(cfg: Config, specs: list[downstream.RunSpec]) -> list[downstream.RunSpec]:
    """Seed by seed, every encoder and the baselines at each seed; within a seed the runs on stored
    features first (seconds each), then the fine-tuning runs: a study stopped part-way has whole
    paired seeds to report."""
    from histossl.protocols import PROTOCOLS

    seeds = {seed: i for i, seed in enumerate(cfg.downstream.seeds)}
    return sorted(specs, key=lambda s: (seeds.get(s.seed, 0), PROTOCOLS.get(s.protocol).trains_encoder))


def pretrain_and_run(cfg: Config, out: Path, specs: list[downstream.RunSpec]) -> None:
    """Seed by seed: the encoders that seed's unrecorded runs read, then those runs. A study stopped
    part-way has whole seeds, and a restored one (``benchmarks/publish_report.py --restore``) keeps
    only the encoders of one seed at a time to retrain before its runs resume."""
    for seed in cfg.downstream.seeds:
        pretrain_all(cfg, out, needed=unrecorded_encoders([s for s in specs if s.seed == seed], out))
        run_downstream(cfg, out, specs, seed)


def run_downstream(cfg: Config, out: Path, specs: list[downstream.RunSpec], seed: int | None = None) -> int:
    """Run every spec (of ``seed``, where given) not yet in results.jsonl; returns how many ran now.

    Protocols that read a frozen encoder get its features from the feature store (``OUT/features``),
    computed once per encoder file and reused by every such run.
    """
    from histossl.protocols import PROTOCOLS

    target = load_dataset(cfg, cfg.target, out)
    data, subsets = target_data(cfg, target, out)
    done = records.finished_runs(out / RESULTS, repair=ranks.is_owner())
    left_over = in_run_order(cfg, [s for s in specs if f"downstream/{s.name}" not in done])
    todo = [s for s in left_over if seed is None or s.seed == seed]
    if not ranks.is_owner():  # join rank 0's multi-process fits; runs on cached features are single-process, its own
        for spec in (s for s in todo if PROTOCOLS.get(s.protocol).trains_encoder):
            downstream.run(cfg, spec, data, subsets[spec.seed][spec.budget], out / "downstream" / spec.name)
        return 0
    # The report says how many of these are recorded: a study stopped part-way is reported as partial.
    atomic_write_json(out / PLAN, {"runs": [f"downstream/{s.name}" for s in specs]})
    if not todo and (left_over or seed not in (None, cfg.downstream.seeds[-1])):
        return 0  # nothing of this seed to run: said once, at the last seed, when nothing is left at all
    log.info("downstream%s: %d runs, %d already recorded, %d to run now", "" if seed is None else f" seed {seed}",
             len(specs), len(specs) - len(left_over), len(todo))
    timing = pace.Pace()
    for r in records.read_dicts(out)[0]:  # a resumed study times its remaining runs by the recorded ones
        if r["protocol"] in PROTOCOLS:
            timing.add(PROTOCOLS.get(r["protocol"]).trains_encoder, (r.get("label_fraction"), r.get("shots")), r.get("wall_s"))
    recorded = len(specs) - len(left_over)
    for i, spec in enumerate(todo, 1):
        record = run_one(cfg, out, spec, data, subsets[spec.seed][spec.budget])
        records.append(out / RESULTS, record)
        timing.add(PROTOCOLS.get(spec.protocol).trains_encoder, (spec.label_fraction, spec.shots), record.wall_s)
        if record.status == "diverged":
            log.warning("[%d/%d] %s: diverged (%s); recorded, the study goes on", recorded + i, len(specs), spec.name, record.diverged)
            continue
        split = "test" if cfg.downstream.test else "val"
        # the time left counts every unrecorded run, of later seeds too (not their pretraining)
        left = timing.left([(PROTOCOLS.get(s.protocol).trains_encoder, (s.label_fraction, s.shots)) for s in left_over[left_over.index(spec) + 1:]])
        log.info(
            "[%d/%d] %s: %s acc %.2f%%, balanced acc %.2f%% (%.0f s)%s",
            recorded + i, len(specs), spec.name, split, 100 * getattr(record, f"{split}_acc"), 100 * getattr(record, f"{split}_balanced_acc"),
            record.wall_s, f"; about {pace.duration(left)} left at this pace" if left else "",
        )
    return len(todo)


def run_one(cfg: Config, out: Path, spec: downstream.RunSpec, data, labeled: np.ndarray) -> records.RunRecord:
    """One downstream run on rank 0, its features from the store where its protocol reads them; a run
    whose loss leaves float range gives a ``diverged`` record (kept, so a rerun does not repeat it)."""
    from histossl.protocols import PROTOCOLS

    stored = None
    if PROTOCOLS.get(spec.protocol).uses_features:
        stored = features.features(cfg, Path(spec.init), data.images, out / features.FOLDER, data.key)
    stamp = {**provenance.record_fields(), "data_fingerprint": stale.current(out).get(cfg.target)}
    try:
        record = downstream.run(cfg, spec, data, labeled, out / "downstream" / spec.name, stored)
    except (Diverged, RuntimeError) as err:
        if not isinstance(err, Diverged) and "overflow" not in str(err):
            raise
        # RuntimeError "value cannot be converted to type float without overflow": an optimizer step past float range
        record = diverged_record(cfg, spec, len(labeled), str(err).splitlines()[0])
    return dataclasses.replace(record, **stamp)


def diverged_record(cfg: Config, spec: downstream.RunSpec, n_labeled: int, reason: str) -> records.RunRecord:
    """The record of a run that diverged: its settings, ``status: diverged``, metrics null."""
    return records.RunRecord(
        **downstream.spec_fields(cfg, spec),
        n_labeled=int(n_labeled),
        lr=downstream.run_lr(cfg, spec.lr_schedule) if spec.lr_schedule else None,
        status="diverged",
        diverged=reason,
        head=cfg.downstream.head,
    )


def build_report(out: Path) -> Path:
    from histossl.report import build_report as build

    return build(out)


def _backend(cfg: Config) -> str:
    """The process-group backend Lightning's DDP would choose: nccl on GPUs, gloo on CPUs."""
    import torch

    return "nccl" if torch.cuda.is_available() and cfg.trainer.accelerator in ("auto", "gpu", "cuda") else "gloo"


def join_study(cfg: Config, out: Path, downstream_runs: bool = True, evaluate: list[downstream.RunSpec] | None = None) -> Path:
    """A rank other than 0: the same fits in the same order as rank 0, reading what it wrote, writing nothing."""
    ranks.wait_for_owner(_backend(cfg))
    if evaluate is not None:
        run_downstream(cfg, out, evaluate)
    else:
        if downstream_runs:
            pretrain_and_run(cfg, out, run_specs(cfg, last_stages(plan_encoders(cfg)), out))
        else:
            pretrain_all(cfg, out)
    return out / RESULTS


def run_study(cfg: Config, out: Path) -> Path:
    """The whole study; returns the path of report.md (on ranks other than 0: of results.jsonl)."""
    if not ranks.is_owner():
        return join_study(cfg, out)
    preflight.check_out_outside_data(cfg, out)  # before the lock file is made in it
    with study_lock(out):
        check_config(cfg, out)
        stale.reconcile(cfg, out)
        preflight.check_before_work(cfg, out)
        with provenance.invocation(out):
            write_config(cfg, out)
            ranks.wait_for_owner(_backend(cfg))  # torchrun: the other ranks start now
            target_data(cfg, load_dataset(cfg, cfg.target, out), out)  # bad budgets fail now, not after pretraining
            pretrain_and_run(cfg, out, run_specs(cfg, last_stages(plan_encoders(cfg)), out))
        if not cfg.downstream.test:
            log.info("tuning study (downstream.test: false): no report; compare the val_* fields of %s", out / RESULTS)
            return out / RESULTS
        return build_report(out)


def run_pretrain(cfg: Config, out: Path) -> dict[str, list[Path]]:
    """Every encoder for every pretraining seed; returns each entry's encoder files, one per seed."""
    if not ranks.is_owner():
        join_study(cfg, out, downstream_runs=False)
        return {}
    preflight.check_out_outside_data(cfg, out)  # before the lock file is made in it
    with study_lock(out):
        check_config(cfg, out)
        stale.reconcile(cfg, out)
        preflight.check_before_work(cfg, out, downstream=False)
        with provenance.invocation(out):
            write_config(cfg, out)
            ranks.wait_for_owner(_backend(cfg))
            stages = pretrain_all(cfg, out)
        return {name: [out / "pretrain" / s.folder / "encoder.safetensors" for s in per_seed] for name, per_seed in stages.items()}


def run_evaluate(cfg: Config, out: Path, encoder_file: Path) -> Path:
    """Downstream runs for one encoder file (no baselines), then the report."""
    if not encoder_file.is_file():
        raise HistosslError(f"encoder file not found: {encoder_file}")
    name = encoder_file.parent.name if encoder_file.name == "encoder.safetensors" else encoder_file.stem
    stage = pretrain.Stage(folder="", method="external", dataset="", epochs=0, init=str(encoder_file), chain=name, key={}, seed=cfg.seed)
    specs = [
        dataclasses.replace(s, init=str(encoder_file.resolve()), pretrain_dir=None, pretrain_seed=None)
        for s in run_specs(cfg, {name: [stage]}, out)
        if s.method != "supervised"
    ]
    if not ranks.is_owner():
        return join_study(cfg, out, evaluate=specs)
    preflight.check_out_outside_data(cfg, out)  # before the lock file is made in it
    with study_lock(out):
        check_config(cfg, out)
        stale.reconcile(cfg, out)
        preflight.check_before_work(cfg, out, encoders=[])
        with provenance.invocation(out):
            write_config(cfg, out)
            ranks.wait_for_owner(_backend(cfg))
            run_downstream(cfg, out, specs)
        return build_report(out)
