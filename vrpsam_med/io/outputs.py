"""Write results: masks in the source geometry (NIfTI or DICOM SEG by extension), PNG overlays, JSON."""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from vrpsam_med.io.atomic import atomic_write
from vrpsam_med.io.figures import overlay_rgb, save_png
from vrpsam_med.io.volume import Volume
from vrpsam_med.io.writers import write_dicom_seg, write_mask_nifti


def write_mask(labels: np.ndarray, like: Volume, out: str | Path, label_names: dict[int, str],
               overwrite: bool = False) -> Path:
    """Label volume (canonical order) -> ``out``: DICOM SEG for ``.dcm``, else NIfTI, on the source grid."""
    out = Path(out)
    if out.suffix.lower() == ".dcm":
        write_dicom_seg(labels, like, out, label_names=label_names, overwrite=overwrite)
    else:
        write_mask_nifti(labels, like, out, overwrite=overwrite, label_names=label_names)
    return out


def write_overlay(image01: np.ndarray, labels: np.ndarray, out: str | Path, box: Sequence[float] | None = None,
                  overwrite: bool = False, protect: Sequence[Path] = ()) -> Path:
    """Overlay PNG of a display slice (values in [0, 1]) and its labels, written atomically."""
    out = Path(out)
    with atomic_write(out, overwrite=overwrite, protect=list(protect)) as tmp:
        save_png(overlay_rgb(image01, labels, box=box), tmp)
    return out


def write_json(data: dict, out: str | Path, overwrite: bool = False) -> Path:
    out = Path(out)
    with atomic_write(out, overwrite=overwrite) as tmp:
        Path(tmp).write_text(json.dumps(data, indent=2, default=jsonable))
    return out


def jsonable(o):
    """``json.dumps(default=...)`` hook: numpy scalars/arrays and paths -> plain JSON values."""
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
