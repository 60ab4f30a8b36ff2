"""YAML training configs -> validated :class:`TrainConfig` (unknown keys are named, with a suggestion)."""
from __future__ import annotations

import dataclasses
import difflib
from pathlib import Path
from typing import Any

import yaml

from vrpsam_med.errors import UsageError
from vrpsam_med.training.episodes import EpisodeConfig
from vrpsam_med.training.train import TrainConfig


def _build(cls, data: dict[str, Any], where: str):
    names = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise UsageError(f"{where}: unknown key {key!r}{hint}")
        if key == "episodes":
            if not isinstance(value, dict):
                raise UsageError(f"{where}: 'episodes' must be a mapping")
            value = _build(EpisodeConfig, value, f"{where} episodes")
        kwargs[key] = value
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise UsageError(f"{where}: {exc}") from None


def load_train_config(path: str | Path | None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Config file values, then ``overrides`` (CLI options that were given) on top."""
    data: dict[str, Any] = {}
    where = str(path) if path else "options"
    if path is not None:
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except FileNotFoundError:
            raise UsageError(f"{path}: config file not found") from None
        except yaml.YAMLError as exc:
            raise UsageError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
        if not isinstance(data, dict):
            raise UsageError(f"{path}: expected a mapping of config keys")
    episodes = dict(data.pop("episodes", {}) or {})
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        if key.startswith("episodes."):
            episodes[key.split(".", 1)[1]] = value
        else:
            data[key] = value
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
