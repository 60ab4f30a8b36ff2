"""napari sample data: a small public brain MR scan, loaded through the library.

For now the scan is nilearn's bundled MNI152 T1 template (ships inside the nilearn wheel,
no network). :func:`make_sample_data` is the one place to switch to ``vrpsam_med.demo``.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

from napari_vrpsam_med._reader import LayerData, _import_triton_isolated, volume_to_layer_data

SAMPLE_NAME = "mni152_t1_2mm"


def _sample_dir() -> Path:
    d = Path(tempfile.gettempdir()) / "napari-vrpsam-med"
    try:
        d.mkdir(parents=True, exist_ok=True)
        if os.access(d, os.W_OK):
            return d
    except OSError:
        pass
    return Path(tempfile.mkdtemp(prefix="napari-vrpsam-med-"))  # shared temp dir not writable


def _mni152_nifti() -> Path:
    """The MNI152 T1 template (2 mm) as a NIfTI file in the temp folder (written once)."""
    out = _sample_dir() / f"{SAMPLE_NAME}.nii.gz"
    if not out.exists():
        from nilearn.datasets import load_mni152_template

        img = load_mni152_template(resolution=2)
        fd, tmp = tempfile.mkstemp(suffix=".nii.gz", dir=out.parent)
        os.close(fd)
        try:
            img.to_filename(tmp)
            os.replace(tmp, out)  # atomic: concurrent callers never see a half-written file
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return out


def make_sample_data() -> list[LayerData]:
    """npe2 sample-data hook: the sample scan as one Image layer."""
    _import_triton_isolated()  # see _reader: napari's GL context + late triton import segfaults
    from vrpsam_med.io import load_volume

    path = _mni152_nifti()
    volume = load_volume(path)
    return volume_to_layer_data(volume, name="MNI152 T1 (sample)", source=path)
