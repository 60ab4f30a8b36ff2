"""YAML training configs -> validated :class:`TrainConfig` (unknown keys are named, with a suggestion)."""
from __future__ import annotations

import dataclasses
import difflib
from pathlib import Path
from typing import Any

import yaml

from vrpsam_med.errors import UsageError
from vrpsam_med.training.train import TrainConfig


def _nested(f: dataclasses.Field):
    """The dataclass type of a nested-config field (``episodes``, ``lora``...), else None."""
    if f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
        if dataclasses.is_dataclass(value):
            return type(value)
    return None


def _check_type(key: str, value: Any, default: Any, where: str) -> None:
    """Scalars must have their default's type (ints are accepted for floats); None is 'not set'."""
    if value is None or default is None or default is dataclasses.MISSING:
        return
    if default == "auto":  # tri-state: true, false or "auto"
        if not (isinstance(value, bool) or value == "auto"):
            raise UsageError(f"{where}: {key!r} must be true, false or 'auto', got {value!r}")
        return
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, str):
        ok = isinstance(value, str)
    else:
        return
    if not ok:
        raise UsageError(f"{where}: {key!r} must be a {type(default).__name__}, got {value!r}")


def _build(cls, data: dict[str, Any], where: str):
    names = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise UsageError(f"{where}: unknown key {key!r}{hint}")
        sub = _nested(names[key])
        if sub is not None:
            if not isinstance(value, dict):
                raise UsageError(f"{where}: {key!r} must be a mapping")
            value = _build(sub, value, f"{where} {key}")
        else:
            _check_type(key, value, names[key].default, where)
        kwargs[key] = value
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise UsageError(f"{where}: {exc}") from None


def read_yaml(path: str | Path | None) -> dict[str, Any]:
    """A YAML mapping from ``path`` ({} for None), with one-line errors."""
    if path is None:
        return {}
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except FileNotFoundError:
        raise UsageError(f"{path}: config file not found") from None
    except yaml.YAMLError as exc:
        raise UsageError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise UsageError(f"{path}: expected a mapping of config keys")
    return data


def merge_overrides(data: dict[str, Any], overrides: dict[str, Any] | None) -> dict[str, Any]:
    """Dotted override keys (``lora.rank``) set nested values; None means 'option not given'."""
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in data.items()}
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        *parents, leaf = key.split(".")
        node = out
        for p in parents:
            if not isinstance(node.get(p, {}), dict):
                raise UsageError(f"option {key}: {p!r} is not a section")
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


def load_train_config(path: str | Path | None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Config file values, then ``overrides`` (CLI options that were given) on top."""
    where = str(path) if path else "options"
    data = merge_overrides(read_yaml(path), overrides)
    episodes = dict(data.pop("episodes", {}) or {})
    if "exclude_labels" in data and "exclude" not in episodes:
        episodes["exclude"] = list(data["exclude_labels"])
    data["episodes"] = episodes
    cfg = _build(TrainConfig, data, where)
    for name in ("batch_size", "max_steps", "checkpoint_every", "num_queries"):
        if int(getattr(cfg, name)) < 1:
            raise UsageError(f"{where}: {name} must be >= 1")
    if not 0 <= cfg.episodes.p_supervoxel <= 1 or not 0 <= cfg.episodes.p_negative < 1:
        raise UsageError(f"{where}: episode probabilities must lie in [0, 1]")
    return cfg
