"""The in-memory scan: voxels + geometry + modality, and the one slicing convention.

Conventions (written once, here):
- ``Volume.array`` is float32, shape (X, Y, Z), in the canonical orientation **LPS**
  (axis 0 increases toward patient Left, axis 1 toward Posterior, axis 2 toward Superior).
  Loaders reorient to LPS; the source's own voxel order is kept in ``source_affine`` so
  writers can put masks back exactly on the source grid.
- ``Volume.affine`` maps canonical voxel indices (i, j, k, 1) to world coordinates in
  millimetres, **RAS+** (the NIfTI / nibabel / MONAI convention).
- A 2D slice is returned in *display* orientation (rows, cols) = radiological view:
  axial: rows anterior->posterior, cols patient right->left; coronal: rows superior->inferior,
  cols right->left; sagittal: rows superior->inferior, cols anterior->posterior.
  ``get_slice`` and ``set_slice`` are exact inverses.
- Intensities are raw (Hounsfield units for CT when the source is in HU); model input
  scaling lives in :mod:`vrpsam_med.io.intensity`.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from .formats import image_stem

Axis = Literal["axial", "coronal", "sagittal"]
AXES: dict[str, int] = {"sagittal": 0, "coronal": 1, "axial": 2}


def axis_index(axis: str | int) -> int:
    """Map 'axial' | 'coronal' | 'sagittal' (or 0/1/2) to the canonical array axis."""
    if isinstance(axis, int) and axis in (0, 1, 2):
        return axis
    try:
        return AXES[str(axis).lower()]
    except KeyError:
        raise ValueError(f"unknown axis {axis!r}; use one of axial, coronal, sagittal") from None


@dataclass
class Volume:
    """A 3D scan in canonical LPS voxel order (see module docstring)."""

    array: np.ndarray
    affine: np.ndarray
    modality: str = "unknown"  # "CT" | "MR" | "unknown"
    source: Path | None = None
    source_affine: np.ndarray | None = None  # affine of the file's own voxel order (for writers)
    is_hu: bool = False  # True when CT intensities are Hounsfield units
    series_uid: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    _digest: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.array.ndim != 3:
            raise ValueError(f"{self.source or 'volume'}: expected a 3D volume, got shape {self.array.shape}")
        self.array = np.ascontiguousarray(self.array, dtype=np.float32)
        self.affine = np.asarray(self.affine, dtype=np.float64)
        if self.source_affine is None:
            self.source_affine = self.affine.copy()

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.array.shape)  # type: ignore[return-value]

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along the canonical axes (L, P, S)."""
        return tuple(float(v) for v in np.linalg.norm(self.affine[:3, :3], axis=0))  # type: ignore[return-value]

    @property
    def name(self) -> str:
        if self.source is None:
            return "volume"
        return image_stem(Path(self.source).name)

    def digest(self) -> str:
        """Content hash of voxels + geometry: the embedding-cache key for this volume."""
        if self._digest is None:
            h = hashlib.sha256()
            h.update(np.asarray(self.array.shape, dtype=np.int64).tobytes())
            h.update(self.array.tobytes())
            h.update(np.round(self.affine, 3).tobytes())
            self._digest = h.hexdigest()[:24]
        return self._digest

    def num_slices(self, axis: str | int = "axial") -> int:
        return self.array.shape[axis_index(axis)]

    def get_slice(self, index: int, axis: str | int = "axial") -> np.ndarray:
        return get_slice(self.array, index, axis)


class SliceIndexError(IndexError):
    """A slice index outside the volume."""


def _check_index(n: int, index: int, axis: str | int) -> None:
    if not 0 <= index < n:
        raise SliceIndexError(f"slice {index} is out of range for the {axis} axis (0..{n - 1})")


def get_slice(array: np.ndarray, index: int, axis: str | int = "axial") -> np.ndarray:
    """2D slice of an LPS-ordered (X, Y, Z) array in display orientation (see module docstring)."""
    ax = axis_index(axis)
    _check_index(array.shape[ax], index, axis)
    if ax == 2:  # (L, P) -> rows P (anterior first), cols L (patient right first)
        return array[:, :, index].T
    if ax == 1:  # (L, S) -> rows superior first, cols patient right first
        return array[:, index, :].T[::-1, :]
    return array[index, :, :].T[::-1, :]  # (P, S) -> rows superior first, cols anterior first


def set_slice(array: np.ndarray, index: int, values: np.ndarray, axis: str | int = "axial") -> None:
    """Inverse of :func:`get_slice`: write a display-oriented 2D slice back in place."""
    ax = axis_index(axis)
    _check_index(array.shape[ax], index, axis)
    if ax == 2:
        array[:, :, index] = values.T
    elif ax == 1:
        array[:, index, :] = values[::-1, :].T
    else:
        array[index, :, :] = values[::-1, :].T


def shown_slices(array: np.ndarray, axis: str | int = "axial") -> np.ndarray:
    """Every slice along ``axis`` in display orientation: (S, rows, cols)."""
    ax = axis_index(axis)
    return np.stack([get_slice(array, k, ax) for k in range(array.shape[ax])])


def from_shown_slices(slices: np.ndarray, axis: str | int = "axial") -> np.ndarray:
    """Inverse of :func:`shown_slices`: (S, rows, cols) display slices -> the LPS-ordered array."""
    ax = axis_index(axis)
    shape = [slices.shape[2], slices.shape[1]]  # in-plane axes in array order show as (second, first)
    shape.insert(ax, slices.shape[0])
    out = np.zeros(shape, slices.dtype)
    for k, sl in enumerate(slices):
        set_slice(out, k, sl, ax)
    return out


def slice_shape(shape: tuple[int, int, int], axis: str | int = "axial") -> tuple[int, int]:
    """Display (rows, cols) of slices along ``axis`` for a volume of ``shape``."""
    ax = axis_index(axis)
    rest = [s for i, s in enumerate(shape) if i != ax]
    return rest[1], rest[0]
