"""Engine settings that belong to a model (``engine.json`` in its folder), like its stop rule.

A fine-tuned decoder can want other engine settings than LiteMedSAM's own, e.g. a wider box after a
seed localised in another patient: a decoder trained on loose boxes (``box_prompts.p_larger``) can
then let the structure grow to its size instead of being clipped by a box taken from a smaller slice.
``SegmenterConfig`` fields set to ``"model"`` take these values, else the shipped defaults.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from vrpsam_med.models.backbones import CheckpointError

FILE = "engine.json"
DEFAULTS = {"localised_box_margin": 0.03}  # tuned on train for LiteMedSAM's decoder (docs/vrp.md)


def save(folder: str | Path, settings: dict[str, float]) -> Path:
    """Write ``folder/engine.json`` (atomically); only known keys."""
    from vrpsam_med.io.atomic import atomic_write

    path = Path(folder) / FILE
    _checked(settings, path)
    with atomic_write(path, overwrite=True) as tmp:
        tmp.write_text(json.dumps({k: float(v) for k, v in settings.items()}, indent=2))
    return path


def load(folder: str | Path) -> dict[str, float]:
    """The settings stored in ``folder`` ({} when there are none); a malformed file is an error."""
    path = Path(folder) / FILE
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except ValueError as exc:
        raise CheckpointError(f"{path}: not JSON ({exc})") from exc
    _checked(data, path)
    return {k: float(v) for k, v in data.items()}


def check(settings: object) -> None:
    """ValueError (without a location) when ``settings`` is not a mapping of known, valid settings."""
    if not isinstance(settings, dict):
        raise ValueError("expected an object of engine settings")
    for key, value in settings.items():
        if key not in DEFAULTS:
            raise ValueError(f"unknown engine setting {key!r} (known: {', '.join(DEFAULTS)})")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise ValueError(f"{key} must be a number >= 0, got {value!r}")


def _checked(settings: object, path: Path) -> None:
    try:
        check(settings)
    except ValueError as exc:
        raise CheckpointError(f"{path}: {exc}") from None


def resolve(value: float | str, model: object, key: str) -> float:
    """A ``SegmenterConfig`` value: ``"model"`` -> the model's setting, else the shipped default."""
    if value == "model":
        return float(getattr(model, "engine_settings", {}).get(key, DEFAULTS[key]))
    if isinstance(value, str):
        raise ValueError(f"{key}: expected 'model' or a number, got {value!r}")
    return float(value)
