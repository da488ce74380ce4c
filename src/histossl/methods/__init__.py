"""Pretext methods, one short file each, registered by name with their settings dataclass.

A method file holds its settings dataclass, its views, heads and loss, and one ``Method`` subclass
(``histossl.methods.base``), registered as ``@METHODS.register("byol", config=BYOLConfig)``.

Settings of an encoder's method come, later over earlier, from:

1. the defaults of the method's dataclass;
2. ``pretrain.method`` for rotnet, rotnet_jitter and simclr (the block existing configs use);
3. ``pretrain.methods.<method>`` (e.g. ``pretrain.methods.dino.teacher_temp: 0.05``);
4. ``encoders.<name>.settings`` (this encoder only).

A key the method's dataclass does not have (``teacher_temp`` on a SimCLR encoder) is a ConfigError.
Only the chosen method's resolved settings enter a stage's folder hash (``settings_key``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from histossl.config import Config, EncoderConfig, _build, to_dict
from histossl.errors import ConfigError
from histossl.methods.base import COLLAPSE_METRICS, Method, StepOutput, ViewSpec, collapse_metrics  # noqa: F401
from histossl.registry import Registry

METHODS: Registry[type[Method]] = Registry("method")


def _method(name: str, key: str) -> type[Method]:
    try:
        return METHODS.get(name)
    except ConfigError as err:
        raise ConfigError(f"{key}: {err}") from None


def _checked(name: str, values: dict[str, Any], key: str) -> dict[str, Any]:
    """``values`` after checking each key is a setting of method ``name``."""
    fields = [f.name for f in dataclasses.fields(METHODS.config(name))]
    for item in values:
        if item not in fields:
            raise ConfigError(f"{key}.{item}: not a setting of method {name!r}; its settings: {', '.join(fields)}")
    return dict(values)


def method_settings(cfg: Config, entry: EncoderConfig, key: str = "encoders") -> Any:
    """The resolved settings dataclass of ``entry``'s method (see the module docstring)."""
    name = entry.method
    cls, config_type = _method(name, f"{key}.method"), METHODS.config(name)
    values: dict[str, Any] = {}
    if cls.legacy_settings:
        names = {f.name for f in dataclasses.fields(config_type)}
        values |= {k: v for k, v in to_dict(cfg.pretrain.method).items() if k in names}
    values |= _checked(name, cfg.pretrain.methods.get(name) or {}, f"pretrain.methods.{name}")
    values |= _checked(name, entry.settings, f"{key}.settings")
    return _build(config_type, values, f"{key}.settings")


def settings_key(cfg: Config, entry: EncoderConfig) -> dict:
    """What of the method's settings goes into a stage's folder hash.

    The legacy methods hash the whole ``pretrain.method`` block with their resolved fields over it:
    with default settings that is exactly the dict hashed before, so committed stages keep their
    folders. Every other method hashes its own resolved settings only.
    """
    settings = to_dict(method_settings(cfg, entry))
    return to_dict(cfg.pretrain.method) | settings if METHODS.get(entry.method).legacy_settings else settings


def check_method_settings(cfg: Config) -> None:
    """Every ``pretrain.methods`` entry names a registered method and only its settings; every encoder's
    settings resolve and pass its method's ``check``. Raises a ConfigError naming the key."""
    for name, values in cfg.pretrain.methods.items():
        _method(name, f"pretrain.methods.{name}")
        if not isinstance(values, dict):
            raise ConfigError(f"pretrain.methods.{name}: expected a mapping of setting to value, got {values!r}")
        _checked(name, values, f"pretrain.methods.{name}")
    for enc_name, entry in cfg.encoders.items():
        key = f"encoders.{enc_name}"
        settings = method_settings(cfg, entry, key)
        METHODS.get(entry.method).check(settings, cfg.pretrain, cfg.image_size, f"pretrain.methods.{entry.method}")


# Importing the modules registers them.
from histossl.methods import (  # noqa: E402,F401
    barlow_twins,
    byol,
    dino,
    moco_v2,
    moco_v3,
    rotnet,
    rotnet_jitter,
    simclr,
    simsiam,
    vicreg,
)
