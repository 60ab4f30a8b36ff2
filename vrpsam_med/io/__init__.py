"""Scan input/output: load volumes (NIfTI, NRRD, MetaImage, DICOM), write masks (NIfTI, DICOM SEG).

The light pieces (errors, :class:`Volume`, atomic writes) import eagerly; the readers and
writers (MONAI, SimpleITK, highdicom) are imported on first use, so ``import vrpsam_med.io``
stays cheap.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from vrpsam_med.io.atomic import atomic_write, check_output
from vrpsam_med.io.errors import OutputExistsError, VolumeError, VolumeWarning
from vrpsam_med.io.volume import SliceIndexError, Volume, get_slice, set_slice, slice_shape

_LAZY = {
    "load_volume": "vrpsam_med.io.readers",
    "volume_info": "vrpsam_med.io.readers",
    "SimpleITKReader": "vrpsam_med.io.readers",
    "list_dicom_series": "vrpsam_med.io.dicom",
    "SeriesInfo": "vrpsam_med.io.dicom",
    "write_mask_nifti": "vrpsam_med.io.writers",
    "write_dicom_seg": "vrpsam_med.io.writers",
}

__all__ = [
    "OutputExistsError", "SliceIndexError", "Volume", "VolumeError", "VolumeWarning", "atomic_write", "check_output",
    "get_slice", "set_slice", "slice_shape", *_LAZY,
]

if TYPE_CHECKING:  # pragma: no cover  (exported through __all__ via _LAZY, which ruff cannot see)
    from vrpsam_med.io.dicom import SeriesInfo, list_dicom_series  # noqa: F401
    from vrpsam_med.io.readers import SimpleITKReader, load_volume, volume_info  # noqa: F401
    from vrpsam_med.io.writers import write_dicom_seg, write_mask_nifti  # noqa: F401


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
