"""Reading an experiment config: YAML or plain data checked against the schema's types, then validated;
every error names the offending key."""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from pathlib import Path

import yaml

from ..backbones.registry import config_class, list_backbones
from ..errors import DDSMError
from ..io import read_text
from .schema import ExperimentConfig, MultiStageConfig, equal_stage_boundaries
from .shipped import config_path
from .validation import validate


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _coerce(value, tp, key: str):
    """Check `value` against annotation `tp` and return it in that type, or raise naming `key`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType) and key == "model":  # the section of a registered backbone
        kind = value.get("kind", "unet") if isinstance(value, dict) else "unet"  # not a mapping: _build says so
        if kind not in list_backbones():
            raise DDSMError(f"{key}.kind: expected {' or '.join(list_backbones())}, got {kind!r}")
        return _build(config_class(kind), value, key)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        section = None  # a mapping for an optional section (train.sparsity): its own error names the key
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except DDSMError as exc:
                if dataclasses.is_dataclass(arg) and isinstance(value, dict):
                    section = section or exc
        if section is not None:
            raise section
        raise DDSMError(f"{key}: expected {' or '.join(_type_name(a) for a in args)}, got {value!r}")
    if origin is dict:
        key_tp, value_tp = typing.get_args(tp)
        if not isinstance(value, dict):
            raise DDSMError(f"{key}: expected a mapping, got {value!r}")
        return {_coerce(k, key_tp, key): _coerce(v, value_tp, f"{key}.{k}") for k, v in value.items()}
    if origin is tuple:
        (item_tp, _ellipsis) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise DDSMError(f"{key}: expected a list of {_type_name(item_tp)}, got {value!r}")
        return tuple(_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value))
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        if not math.isfinite(value):
            raise DDSMError(f"{key}: expected a finite number, got {value!r}")
        return float(value)
    if tp in (int, str, bool) and type(value) is tp:
        return value
    raise DDSMError(f"{key}: expected {_type_name(tp)}, got {value!r}")


def _build(cls, data, prefix: str):
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise DDSMError(f"{prefix or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            raise DDSMError(f"unknown key '{full}' (known: {', '.join(names)})")
        kwargs[key] = _coerce(value, hints[key], full)
    return cls(**kwargs)


def config_from_dict(data: dict) -> ExperimentConfig:
    """Return a validated ExperimentConfig built from plain data."""
    cfg = _build(ExperimentConfig, data, "")
    m = cfg.model
    T = cfg.diffusion.timesteps
    if isinstance(m, MultiStageConfig) and m.stage_boundaries is None and 1 <= len(m.decoders) <= T:
        cfg.model = dataclasses.replace(m, stage_boundaries=equal_stage_boundaries(len(m.decoders), T))
    validate(cfg)
    return cfg


def load_config(path: str | Path) -> ExperimentConfig:
    """Return the validated experiment config stored in a YAML file, or shipped under that name
    (`digits`, `digits-dit`: `ddsm-search configs` lists them)."""
    path = config_path(path)
    text = read_text(path, "config", "a YAML experiment")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise DDSMError(f"malformed YAML in {path}{where}: {getattr(exc, 'problem', exc)}") from None
    if data is None:
        raise DDSMError(f"{path} is empty (expected a YAML experiment: see `ddsm-search configs show digits`)")
    try:
        return config_from_dict(data)
    except DDSMError as exc:
        raise DDSMError(f"{path}: {exc}") from None
