"""One typed configuration tree: every default lives here.

A study is described by a YAML file whose keys mirror these dataclasses. ``--set a.b=c`` overrides a
dotted key with a value parsed by the field's type. Unknown keys and wrong types raise a ConfigError
that names the dotted key and what is allowed. The loaded config is frozen; derived values (paths,
chain names) are computed by the code that needs them, never written back.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from histossl.errors import ConfigError


@dataclass(frozen=True)
class SynthConfig:
    """Settings of the procedurally generated tissue set (``histossl data synth``)."""

    classes: list[str] = field(
        default_factory=lambda: ["tumour", "stroma", "lymphocytes", "adipose", "mucus", "debris", "background"]
    )
    n_groups: int = 12  # simulated slides, each with its own stain
    per_class_per_group: int = 20
    image_size: int = 64
    seed: int = 0


@dataclass(frozen=True)
class StainNormalizationConfig:
    """Stain normalisation applied when images are decoded into the cache (see ``data/stain.py``)."""

    method: Literal["macenko", "reinhard"] = "macenko"
    reference: str = ""  # the reference image whose stains every image is mapped to


def added_later(before: Any = dataclasses.MISSING) -> dict:
    """Metadata of a setting added after studies were run without it: ``field(..., metadata=added_later())``.

    ``before`` is the value that gives the behaviour of the versions without the setting (by default
    the field's default). A resolved ``config.yaml`` written without the key reads it as ``before``
    (``from_written``; never a user's config, which omits defaults), and a pretraining stage's folder
    hash leaves the field out while it holds ``before``, so stage folders made before it keep their
    names (``tests/test_stage_names.py``).
    """
    return {"added_later": True} if before is dataclasses.MISSING else {"added_later": True, "before": before}


def value_before(f: dataclasses.Field) -> Any:
    """The value of an ``added_later`` field that means what versions without it did."""
    return f.metadata["before"] if "before" in f.metadata else f.default


@dataclass(frozen=True)
class DatasetConfig:
    """One data set: an image folder (``ROOT/<class>/…`` or ``ROOT/<group>/<class>/…``) or a CSV manifest."""

    path: str = ""
    synthetic: bool = False  # generate it with ``synth`` settings into <out>/data/<name> instead of reading ``path``
    skip_unreadable: bool = False  # False: refuse to start and name unreadable files; True: skip and count them
    # False: unlabelled images at any depth (pretraining only, never the target)
    labels: bool = field(default=True, metadata=added_later())
    stain_normalization: StainNormalizationConfig | None = field(default=None, metadata=added_later())


@dataclass(frozen=True)
class SplitConfig:
    """Train/val/test split of the target data set: stratified by class, whole groups (patients) per split."""

    val_fraction: float = 0.1
    test_fraction: float = 0.2
    seed: int = 0




@dataclass(frozen=True)
class ViewConfig:
    """Random views drawn independently per image (and per view) on the training device."""

    crop: bool = True
    crop_scale_min: float = 0.4  # random resized crop: area fraction in [crop_scale_min, crop_scale_max]
    crop_scale_max: float = field(default=1.0, metadata=added_later())  # below 1: DINO's local crops
    crop_ratio_max: float = 4 / 3  # aspect ratio in [1/crop_ratio_max, crop_ratio_max]
    hflip: bool = True
    vflip: bool = True
    rot90: bool = True  # tissue has no canonical orientation: 0/90/180/270 at random
    color_jitter_prob: float = 0.8
    color_jitter_brightness: float = 0.4
    color_jitter_contrast: float = 0.4
    color_jitter_saturation: float = 0.2
    color_jitter_hue: float = 0.05
    grayscale_prob: float = 0.2
    blur_prob: float = 0.2
    blur_sigma_max: float = 1.0  # in pixels of the output view
    hed_jitter_prob: float = 0.5
    hed_jitter_sigma: float = 0.05  # multiplicative noise on H and E optical densities (Tellez et al. 2018)
    hed_jitter_bias: float = 0.05  # additive noise on H and E optical densities
    solarize_prob: float = field(default=0.0, metadata=added_later())  # BYOL/DINO: invert pixels >= 0.5


@dataclass(frozen=True)
class OptimConfig:
    optimizer: Literal["sgd", "adamw", "lars"] = "sgd"
    lr: float = 0.06
    weight_decay: float = 5e-4
    momentum: float = 0.9
    warmup_epochs: int = 1
    lr_schedule: Literal["cosine", "constant"] = "cosine"


@dataclass(frozen=True)
class BackboneConfig:
    name: str = "resnet18"
    stem: Literal["standard", "small"] = "standard"  # small: 3x3 stride-1 first conv, no max-pool (small patches)


@dataclass(frozen=True)
class MethodConfig:
    """Settings of the first three methods (rotnet, rotnet_jitter, simclr), kept for existing configs.

    Every other method's settings live in ``pretrain.methods.<method>`` (see ``PretrainConfig``).
    """

    temperature: float = 0.2  # SimCLR NT-Xent temperature
    projection_dim: int = 128  # SimCLR projection head output
    projection_hidden_dim: int = 512
    rotation_head_hidden_dim: int = 0  # RotNet head: 0 = linear on the features


@dataclass(frozen=True)
class PretrainConfig:
    """Settings shared by every pretraining stage."""

    epochs: int = 10
    batch_size: int = 128
    # One pretraining of every encoder per seed; []: the study's ``seed``. Downstream seed i uses the
    # encoder of pretraining seed i mod n, so with as many pretraining as downstream seeds every run
    # has its own encoder and the spread over seeds covers pretraining as well.
    seeds: list[int] = field(default_factory=list)
    optim: OptimConfig = field(default_factory=OptimConfig)
    views: ViewConfig = field(default_factory=ViewConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    # Settings of any registered method by its name, e.g. ``{dino: {teacher_temp: 0.05}}``; each key is
    # checked against that method's settings dataclass (``histossl.methods``), defaults come from it.
    methods: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass(frozen=True)
class BudgetsConfig:
    """Some of a study's label budgets (``downstream.budgets_of``): a subset of its fractions and shots."""

    fractions: list[float] = field(default_factory=list)
    shots: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class EncoderConfig:
    """One pretrained encoder of the study: a method, a start, and the data sets it is trained on in order.

    ``chain: [other, target]`` with ``init: imagenet`` is the seed's imagenet>kidney>breast.
    """

    method: str = "simclr"
    init: str = "random"  # random | imagenet | path to a .pth/.pt/.safetensors state dict
    chain: list[str] = field(default_factory=list)  # empty: the target data set alone
    # Epochs of each stage; a list gives each stage of the chain its own (a large unlabelled pool
    # first, for a few epochs, then the target for more); None: pretrain.epochs.
    epochs: int | list[int] | None = None
    # This encoder's method settings, over ``pretrain.methods.<method>`` (e.g. two DINO encoders that
    # differ in ``teacher_temp``); a key its method does not have is an error.
    settings: dict[str, Any] = field(default_factory=dict)
    # The downstream protocols this encoder is evaluated with, among ``downstream.protocols``; empty: all
    # of them. E.g. ``[frozen, linear, knn]`` for the encoders not worth minutes of fine-tuning a run.
    protocols: list[str] = field(default_factory=list, metadata=added_later())


@dataclass(frozen=True)
class DownstreamConfig:
    """The label-scarce task: an MLP (or linear) head on the encoder, per fraction, mode, schedule and seed."""

    fractions: list[float] = field(default_factory=lambda: [0.05, 0.25, 0.5])
    modes: list[Literal["finetune", "frozen"]] = field(default_factory=lambda: ["finetune", "frozen"])
    # Evaluation protocols, any registered name (histossl.protocols): finetune, frozen, linear, knn.
    # Empty: ``modes`` (the older key) says which protocols run.
    protocols: list[str] = field(default_factory=list)
    shots: list[int] = field(default_factory=list)  # label budgets of k labelled train images per class, beside ``fractions``
    # A protocol run at only some of those budgets, e.g. ``{finetune: {fractions: [0.05, 1.0], shots: [10]}}``:
    # fine-tuning costs minutes a run where the protocols on stored features cost seconds. The supervised
    # baselines (fine-tuned) follow ``finetune``'s unless ``supervised`` names theirs, e.g. fine-tuning the
    # encoders at 5% only and the baseline at 5% and 100%. A protocol not named runs at every budget.
    budgets_of: dict[str, BudgetsConfig] = field(default_factory=dict, metadata=added_later())
    linear_c_grid: list[float] = field(default_factory=lambda: [0.001, 0.01, 0.1, 1.0, 10.0])  # linear probe: inverse L2 strengths tried on validation
    knn_k_grid: list[int] = field(default_factory=lambda: [5, 10, 20, 50, 100])  # kNN: neighbour counts tried on validation
    knn_temperature: float = 0.07  # kNN vote weight exp(cosine / T) (Wu et al. 2018, arXiv:1805.01978; DINO's eval_knn)
    lr_schedules: list[Literal["cosine", "constant"]] = field(default_factory=lambda: ["cosine", "constant"])
    seeds: list[int] = field(default_factory=lambda: [0])
    baselines: list[str] = field(default_factory=lambda: ["random"])  # supervised from these inits
    epochs: int = 100  # fine-tuning: the most epochs a run may take (early stopping ends it sooner)
    # Validations without improvement of ``select_metric`` before a run stops (Lightning's EarlyStopping),
    # for fine-tuning with an epoch budget and for heads on frozen features: each run trains until its
    # validation stops improving, so a 100% run is not starved and a 5% run is not over-fitted.
    # None: every run takes its whole budget (``epochs``, ``frozen_epochs`` or ``steps``).
    patience: int | None = field(default=10, metadata=added_later(before=None))  # studies before it: no early stopping
    # Fine-tuning and heads on frozen features: the fewest optimizer steps a run takes before early
    # stopping may end it (validated about 10 times within them; the maximum of epochs grows to fit
    # them plus ``patience``). A 5% subset has a few batches an epoch: a patience counted in epochs
    # alone can end it after a few dozen steps, still at chance. 0: none.
    min_steps: int = field(default=0, metadata=added_later())
    steps: int | None = None  # fine-tuning: a fixed budget of optimizer steps per run, whatever the fraction (no early stopping); None: ``epochs``
    validations: int = 0  # fine-tuning: validate about this many times per run, evenly spaced; 0: every epoch
    frozen_epochs: int = 100  # a head on cached features: cheap
    batch_size: int = 64
    head: Literal["mlp", "linear"] = "mlp"
    hidden_dim: int = 256
    dropout: float = 0.0
    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: float = 1e-3  # head lr; with a schedule it is the peak
    constant_lr: float | None = None  # lr of the constant schedule (the seed's 5e-6); None: lr
    encoder_lr_scale: float = 0.1  # fine-tuning: encoder lr = lr * encoder_lr_scale
    weight_decay: float = 1e-4
    class_weighted: bool = False  # inverse-frequency class weights in the loss
    select_metric: Literal["val_loss", "val_acc", "val_balanced_acc", "val_auroc"] = "val_balanced_acc"
    threshold: Literal["argmax", "val"] = "argmax"  # two classes: "val" picks the decision threshold on validation
    test: bool = True  # False: a tuning study; the test split is never evaluated (records carry val_* only)
    views: ViewConfig = field(
        default_factory=lambda: ViewConfig(
            crop_scale_min=0.8, color_jitter_prob=0.5, grayscale_prob=0.0, blur_prob=0.0, hed_jitter_prob=0.5
        )
    )


@dataclass(frozen=True)
class TrainerConfig:
    """Passed to Lightning: ``accelerator``, ``devices``, ``precision``, ``strategy``, ``num_nodes``."""

    accelerator: str = "auto"
    devices: str = "auto"
    precision: str = "32-true"
    strategy: str = "auto"
    num_nodes: int = 1
    num_workers: int = 0  # loader workers only slice the decoded cache; 0 is enough on a CPU
    channels_last: bool = False
    compile: bool = False
    progress: bool = True


@dataclass(frozen=True)
class Config:
    name: str = "study"
    seed: int = 0
    image_size: int = 64  # every image is decoded once and resized to this square
    cache_dir: str = ""  # decoded-image cache; "": $HISTOSSL_CACHE_DIR or ~/.cache/histossl
    target: str = "target"  # the data set of the downstream task, a key of ``datasets``
    datasets: dict[str, DatasetConfig] = field(default_factory=lambda: {"target": DatasetConfig(synthetic=True)})
    synth: SynthConfig = field(default_factory=SynthConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    encoders: dict[str, EncoderConfig] = field(default_factory=dict)
    downstream: DownstreamConfig = field(default_factory=DownstreamConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)


# ----------------------------------------------------------------------------------------------
# Building a typed tree from plain data


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return f"mapping of name to {_type_name(typing.get_args(tp)[1])}"
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return f"mapping with keys {', '.join(f.name for f in dataclasses.fields(tp))}"
    return getattr(tp, "__name__", str(tp))


def _build(tp: Any, value: Any, key: str) -> Any:
    """Check ``value`` against type ``tp`` and build it (dataclasses from mappings)."""
    origin = typing.get_origin(tp)
    if tp is Any:  # open mappings (method settings): checked against the method's dataclass later
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key or 'config'}: expected {_type_name(tp)}, got {value!r}")
        known = {f.name: f for f in dataclasses.fields(tp)}
        kwargs = {}
        for name, item in value.items():
            sub = f"{key}.{name}" if key else str(name)
            if name not in known:
                raise ConfigError(f"unknown key {sub!r}; allowed: {', '.join(known)}")
            kwargs[name] = _build(_field_types(tp)[name], item, sub)
        return tp(**kwargs)
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{key}: {value!r} is not one of {_type_name(tp)}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _build(arg, value, key)
            except ConfigError as err:
                errors.append(err)
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
        (item_tp,) = typing.get_args(tp)
        return [_build(item_tp, v, f"{key}.{i}") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
        _, item_tp = typing.get_args(tp)
        return {str(k): _build(item_tp, v if v is not None else {}, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # devices: 2, precision: 16 read naturally in YAML
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {tp!r} at {key}")


def _field_types(tp: type) -> dict[str, Any]:
    return typing.get_type_hints(tp)


def to_dict(config: Any) -> Any:
    """Plain data (for YAML/JSON) from a config tree."""
    if dataclasses.is_dataclass(config):
        return {f.name: to_dict(getattr(config, f.name)) for f in dataclasses.fields(config)}
    if isinstance(config, dict):
        return {k: to_dict(v) for k, v in config.items()}
    if isinstance(config, list):
        return [to_dict(v) for v in config]
    return config


def _parse_value(text: str) -> Any:
    """``--set`` values are YAML scalars or flow collections: ``3``, ``1e-3``, ``true``, ``[0.05, 0.5]``."""
    try:
        return yaml.safe_load(text) if text != "" else ""
    except yaml.YAMLError:
        return text


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Return a copy of ``data`` with ``a.b=c`` overrides applied (values parsed as YAML)."""
    import copy

    data = copy.deepcopy(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. pretrain.epochs=5")
        key, text = item.split("=", 1)
        parts = key.strip().split(".")
        node = data
        for i, part in enumerate(parts[:-1]):
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            if not isinstance(nxt, dict):
                raise ConfigError(f"--set {key}: {'.'.join(parts[: i + 1])} is not a mapping")
            node = nxt
        node[parts[-1]] = _parse_value(text)
    return data


def _merge_defaults(data: Any, default: Any) -> Any:
    """Fill a partial mapping from the default tree, so nested partial overrides keep sibling defaults."""
    if isinstance(data, dict) and dataclasses.is_dataclass(default):
        base = to_dict(default)
        for name, value in data.items():
            sub = getattr(default, name, None)
            base[name] = _merge_defaults(value, sub) if sub is not None else value
        return base
    return data


def from_written(data: dict) -> Config:
    """A Config from a resolved ``config.yaml`` written by histossl, possibly by a version without some settings."""
    return from_dict(_fill_before(data or {}, Config()))


def _fill_before(data: dict, default: Any) -> dict:
    """``data`` with each missing ``added_later`` key that has a ``before`` value set to it, at any depth."""
    filled = dict(data)
    for f in dataclasses.fields(default):
        sub = getattr(default, f.name)
        if f.name not in filled:
            if "before" in f.metadata:
                filled[f.name] = f.metadata["before"]
        elif isinstance(filled[f.name], dict) and dataclasses.is_dataclass(sub):
            filled[f.name] = _fill_before(filled[f.name], sub)
    return filled


def from_dict(data: dict) -> Config:
    """Build and validate a Config from plain data (a parsed YAML file)."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"config: expected a mapping at the top level, got {type(data).__name__}")
    config = _build(Config, _merge_defaults(data, Config()), "")
    validate(config)
    from histossl.methods import check_method_settings  # methods import this module

    check_method_settings(config)
    return config


def load(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Read a YAML config (safe loader), apply ``--set`` overrides, validate."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        data = parse_yaml(path)
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level")
    data = apply_overrides(data, overrides or [])
    return from_dict(data)


def parse_yaml(path: Path) -> Any:
    """The YAML file at ``path`` as plain data; a ConfigError naming the file (and line, column) if it is not."""
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise ConfigError(f"{path}: cannot read ({err.strerror})") from None
    try:
        text = raw.decode("utf-8-sig")  # a byte-order mark, as some Windows editors write, is fine
    except UnicodeDecodeError as err:
        raise ConfigError(
            f"{path}: not UTF-8 text (byte 0x{raw[err.start]:02x} at offset {err.start}); save it as UTF-8"
        ) from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({yaml_error(err)})") from None


def yaml_error(err: yaml.YAMLError) -> str:
    """``line 3, column 1: found character '\\t' that cannot start any token``: where and what."""
    mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
    problem = getattr(err, "problem", None) or (str(err).splitlines() or [type(err).__name__])[0]
    if mark is None:
        return problem
    return f"line {mark.line + 1}, column {mark.column + 1}: {problem}"


def save(config: Config, path: str | Path) -> None:
    """Write the resolved config (every default filled in) as YAML."""
    from histossl.io import atomic_write_text

    atomic_write_text(Path(path), yaml.safe_dump(to_dict(config), sort_keys=False))


def pretrain_seeds(config: Config) -> list[int]:
    """The seeds each encoder is pretrained with (the study seed unless ``pretrain.seeds`` is given)."""
    return list(config.pretrain.seeds) or [config.seed]


def downstream_protocols(config: Config) -> list[str]:
    """The protocols a study runs: ``downstream.protocols``, or ``downstream.modes`` when that is empty."""
    return list(config.downstream.protocols) or list(config.downstream.modes)


def encoder_protocols(config: Config, entry: EncoderConfig) -> list[str]:
    """The protocols ``entry`` is evaluated with: its own ``protocols``, all the study's otherwise."""
    return [p for p in downstream_protocols(config) if not entry.protocols or p in entry.protocols]


BASELINES = "supervised"  # the supervised baselines' key in ``downstream.budgets_of``


def protocol_budgets(config: Config, protocol: str) -> list[tuple[float | None, int | None]]:
    """``(label_fraction, shots)`` of every budget ``protocol`` runs at: the fractions, then the shots
    (those ``downstream.budgets_of`` names for it, all of them otherwise). ``BASELINES``: the supervised
    baselines', fine-tuning's unless ``budgets_of`` names theirs."""
    d = config.downstream
    only = d.budgets_of.get(protocol)
    if only is None and protocol == BASELINES:
        only = d.budgets_of.get("finetune")
    fractions = d.fractions if only is None else [f for f in d.fractions if f in only.fractions]
    shots = d.shots if only is None else [k for k in d.shots if k in only.shots]
    return [(f, None) for f in fractions] + [(None, k) for k in shots]


def stage_epochs(config: Config, entry: EncoderConfig) -> list[int]:
    """The epochs of each stage of ``entry``'s chain."""
    if isinstance(entry.epochs, list):
        return list(entry.epochs)
    return [entry.epochs or config.pretrain.epochs] * len(encoder_chain(config, entry))


def encoder_chain(config: Config, entry: EncoderConfig) -> list[str]:
    """The data sets an encoder is pretrained on, in order (the target alone by default)."""
    return list(entry.chain) or [config.target]


def _validate_dataset(config: Config, name: str, ds: DatasetConfig) -> None:
    key = f"datasets.{name}"
    if not ds.labels and name == config.target:
        raise ConfigError(f"target: data set {name!r} has labels: false; the downstream target needs class labels "
                          "(an unlabelled data set can only be a pretraining chain stage)")
    if not ds.labels and ds.synthetic:
        raise ConfigError(f"{key}.labels: the synthetic data set is labelled; give a path for an unlabelled one")
    if ds.stain_normalization is not None and not ds.stain_normalization.reference:
        raise ConfigError(f"{key}.stain_normalization.reference: give the reference image")


def validate(config: Config) -> None:
    """Range checks the types cannot express. Each error names the dotted key."""

    def need(ok: bool, key: str, msg: str) -> None:
        if not ok:
            raise ConfigError(f"{key}: {msg}")

    need(config.image_size >= 8, "image_size", f"must be at least 8, got {config.image_size}")
    need(config.target in config.datasets, "target", f"{config.target!r} is not a key of datasets ({', '.join(config.datasets)})")
    for name, ds in config.datasets.items():
        need(ds.synthetic or bool(ds.path), f"datasets.{name}.path", "give a path, or synthetic: true")
        _validate_dataset(config, name, ds)
        need(not (ds.synthetic and ds.path), f"datasets.{name}",
             f"synthetic: true and path: {ds.path!r} both given; synthetic data is generated, not read from the path: keep one")
    s = config.split
    need(0 < s.val_fraction < 1, "split.val_fraction", f"must be in (0, 1): model selection needs a validation split, got {s.val_fraction}")
    need(0 < s.test_fraction < 1, "split.test_fraction", f"must be in (0, 1), got {s.test_fraction}")
    need(s.val_fraction + s.test_fraction < 1, "split", "val_fraction + test_fraction must leave a train split")
    need(config.pretrain.epochs >= 1, "pretrain.epochs", f"must be at least 1, got {config.pretrain.epochs}")
    need(config.pretrain.batch_size >= 2, "pretrain.batch_size", f"must be at least 2, got {config.pretrain.batch_size}")
    p_seeds = config.pretrain.seeds
    need(len(set(p_seeds)) == len(p_seeds), "pretrain.seeds", f"give distinct seeds, got {p_seeds}")
    need(len(config.downstream.seeds) % max(1, len(p_seeds)) == 0, "pretrain.seeds",
         f"{len(p_seeds)} pretraining seeds do not divide the {len(config.downstream.seeds)} downstream seeds evenly; "
         "give as many pretraining seeds as downstream seeds (or a divisor of that number)")
    need(config.pretrain.optim.lr > 0, "pretrain.optim.lr", "must be positive")
    need(0 < config.pretrain.views.crop_scale_min <= 1, "pretrain.views.crop_scale_min", "must be in (0, 1]")
    views = config.pretrain.views
    need(views.crop_scale_min <= views.crop_scale_max <= 1, "pretrain.views.crop_scale_max", f"must be in [crop_scale_min, 1], got {views.crop_scale_max}")
    need(0 <= views.solarize_prob <= 1, "pretrain.views.solarize_prob", f"must be in [0, 1], got {views.solarize_prob}")
    need(config.pretrain.method.temperature > 0, "pretrain.method.temperature", "must be positive")
    for name, enc in config.encoders.items():
        key = f"encoders.{name}"
        for ds in enc.chain:
            need(ds in config.datasets, f"{key}.chain", f"{ds!r} is not a key of datasets ({', '.join(config.datasets)})")
        per_stage = enc.epochs if isinstance(enc.epochs, list) else [enc.epochs]
        need(all(e is None or e >= 1 for e in per_stage), f"{key}.epochs", f"must be at least 1, got {enc.epochs}")
        if isinstance(enc.epochs, list):
            stages = encoder_chain(config, enc)
            need(len(enc.epochs) == len(stages), f"{key}.epochs",
                 f"one number per chain stage ({' > '.join(stages)}: {len(stages)}), got {enc.epochs}")
        need(name != "supervised" and not name.startswith("supervised"), key, "names starting with 'supervised' are the baselines'")
        unknown = [p for p in enc.protocols if p not in downstream_protocols(config)]
        need(not unknown, f"{key}.protocols", f"{unknown} not among the study's protocols ({', '.join(downstream_protocols(config))})")
    d = config.downstream
    need(len(d.fractions) + len(d.shots) >= 1, "downstream.fractions", "give at least one fraction (or downstream.shots)")
    for k in d.shots:
        need(k >= 1, "downstream.shots", f"each budget must be at least 1 labelled image per class, got {k}")
    need(len(set(d.shots)) == len(d.shots), "downstream.shots", f"budgets repeat: {d.shots}")
    from histossl.protocols import PROTOCOLS  # imported here: the protocols import the training code, which imports this module

    for name in d.protocols:
        need(name in PROTOCOLS, "downstream.protocols", f"unknown protocol {name!r}; registered: {', '.join(PROTOCOLS.names())}")
    need(len(set(d.protocols)) == len(d.protocols), "downstream.protocols", f"protocols repeat: {d.protocols}")
    for name, only in d.budgets_of.items():
        key = f"downstream.budgets_of.{name}"
        need(name in downstream_protocols(config) or name == BASELINES, key,
             f"{name!r} is not one of the study's protocols ({', '.join(downstream_protocols(config))}) or {BASELINES} (the baselines)")
        need(set(only.fractions) <= set(d.fractions), f"{key}.fractions", f"{only.fractions} must be among downstream.fractions {d.fractions}")
        need(set(only.shots) <= set(d.shots), f"{key}.shots", f"{only.shots} must be among downstream.shots {d.shots}")
        need(len(only.fractions) + len(only.shots) >= 1, key, "give at least one fraction or shots budget (or leave the protocol out)")
    need(len(d.linear_c_grid) >= 1 and all(c > 0 for c in d.linear_c_grid), "downstream.linear_c_grid", f"give positive values, got {d.linear_c_grid}")
    need(len(d.knn_k_grid) >= 1 and all(k >= 1 for k in d.knn_k_grid), "downstream.knn_k_grid", f"give values of at least 1, got {d.knn_k_grid}")
    need(d.knn_temperature > 0, "downstream.knn_temperature", f"must be positive, got {d.knn_temperature}")
    for f in d.fractions:
        need(0 < f <= 1, "downstream.fractions", f"each fraction must be in (0, 1], got {f}")
    need(len(set(d.fractions)) == len(d.fractions), "downstream.fractions", "fractions repeat")
    need(d.epochs >= 1, "downstream.epochs", f"must be at least 1, got {d.epochs}")
    need(d.steps is None or d.steps >= 1, "downstream.steps", f"must be at least 1, got {d.steps}")
    need(d.min_steps >= 0, "downstream.min_steps", f"must be 0 or more, got {d.min_steps}")
    need(d.patience is None or d.patience >= 1, "downstream.patience", f"must be at least 1 (or null: no early stopping), got {d.patience}")
    need(d.validations >= 0, "downstream.validations", f"must be 0 or more, got {d.validations}")
    need(d.frozen_epochs >= 1, "downstream.frozen_epochs", f"must be at least 1, got {d.frozen_epochs}")
    need(d.batch_size >= 1, "downstream.batch_size", f"must be at least 1, got {d.batch_size}")
    need(d.lr > 0, "downstream.lr", "must be positive")
    need(d.constant_lr is None or d.constant_lr > 0, "downstream.constant_lr", "must be positive")
    need(len(d.seeds) >= 1 and len(set(d.seeds)) == len(d.seeds), "downstream.seeds", "give distinct seeds")
    for b in d.baselines:
        need(b in ("random", "imagenet") or Path(b).suffix in (".pth", ".pt", ".safetensors"),
             "downstream.baselines", f"{b!r}: expected random, imagenet or a weights file")
    need(config.trainer.num_workers >= 0, "trainer.num_workers", "must be >= 0")
    check_numbers(config)


# Numbers that may be 0 or more but not reach 1: a probability of dropping is below 1, a momentum of 1 never learns.
# Below 1 (a dropout of 1 drops everything, an SGD momentum of 1 never forgets). A teacher's EMA
# momentum may be 1 (DINO's schedule ends there): method settings are checked by their method.
_BELOW_ONE = ("dropout", "momentum")
_METHOD_SETTINGS = (".settings.", "pretrain.methods.")


def check_numbers(config: Any, key: str = "") -> None:
    """Every number in the tree is finite and not negative; probabilities are at most 1.

    No setting of histossl takes a negative number (seeds included: numpy refuses them), so one walk
    catches ``lr=.inf``, ``weight_decay=-5`` and ``encoder_lr_scale=.nan`` wherever they are given,
    including keys added later.
    """
    if dataclasses.is_dataclass(config):
        for f in dataclasses.fields(config):
            check_numbers(getattr(config, f.name), f"{key}.{f.name}" if key else f.name)
        return
    if isinstance(config, dict):
        for k, v in config.items():
            check_numbers(v, f"{key}.{k}")
        return
    if isinstance(config, list):
        for v in config:
            check_numbers(v, key)
        return
    if isinstance(config, bool) or not isinstance(config, (int, float)):
        return
    name = key.rsplit(".", 1)[-1]
    if not math.isfinite(config):
        raise ConfigError(f"{key}: must be a finite number, got {config}")
    if config < 0:
        raise ConfigError(f"{key}: must not be negative, got {config}")
    if name.endswith("_prob") and config > 1:
        raise ConfigError(f"{key}: a probability must be in [0, 1], got {config}")
    if name in _BELOW_ONE and config >= 1 and not any(part in key for part in _METHOD_SETTINGS):
        raise ConfigError(f"{key}: must be in [0, 1), got {config}")
