"""Intensity presets: raw scan values -> [0, 1] model input, consistent over a whole volume.

Scaling is computed once per volume (not per slice) so neighbouring slices look alike to
the encoder. CT in Hounsfield units uses a window preset; CT that a source already windowed
to 8 bit (no HU) is scaled by 1/255; MR and unknown modalities use robust percentiles.
"""
from __future__ import annotations

import numpy as np

from vrpsam_med.io.volume import Volume

#: (center, width) in HU, the usual radiology presets.
WINDOW_PRESETS: dict[str, tuple[float, float]] = {
    "abdomen": (40.0, 400.0),
    "liver": (60.0, 160.0),
    "lung": (-600.0, 1500.0),
    "bone": (400.0, 1800.0),
    "brain": (40.0, 80.0),
    "mediastinum": (50.0, 350.0),
}
MR_PERCENTILES = (0.5, 99.5)


def intensity_range(volume: Volume, preset: str | None = None) -> tuple[float, float]:
    """The (low, high) raw values that map to 0 and 1 for ``volume``."""
    if preset is not None and preset not in WINDOW_PRESETS and preset != "percentile":
        raise ValueError(f"unknown intensity preset {preset!r}; choose from "
                         f"{', '.join([*WINDOW_PRESETS, 'percentile'])}")
    arr = volume.array
    if volume.modality == "CT" and volume.is_hu and preset != "percentile":
        c, w = WINDOW_PRESETS[preset or "abdomen"]
        return c - w / 2.0, c + w / 2.0
    if preset in WINDOW_PRESETS:
        raise ValueError(f"{volume.source or 'volume'}: window preset {preset!r} needs CT in "
                         "Hounsfield units; this volume is not")
    if volume.modality == "CT" and arr.min() >= 0 and arr.max() <= 255:
        return 0.0, 255.0  # already windowed to 8 bit upstream
    sample = arr[:: max(1, arr.shape[0] // 128), :: max(1, arr.shape[1] // 128), :]
    lo, hi = np.percentile(sample, MR_PERCENTILES)
    if hi <= lo:
        hi = lo + 1.0
    return float(lo), float(hi)


def to_unit_range(array: np.ndarray, low: float, high: float) -> np.ndarray:
    """Clip to [low, high] and scale to float32 [0, 1]."""
    out = (np.asarray(array, dtype=np.float32) - low) / max(high - low, 1e-6)
    return np.clip(out, 0.0, 1.0, out=out)


def model_intensities(volume: Volume, preset: str | None = None) -> np.ndarray:
    """Whole volume scaled to float32 [0, 1] with :func:`intensity_range`."""
    lo, hi = intensity_range(volume, preset)
    return to_unit_range(volume.array, lo, hi)
