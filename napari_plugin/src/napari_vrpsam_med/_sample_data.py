"""napari sample data: the project's demo scan (``vrpsam_med.demo``), loaded through the library.

The scan is nilearn's bundled MNI152 T1 template (ships inside the nilearn wheel, no network).
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

from napari_vrpsam_med._reader import LayerData, _import_triton_isolated, volume_to_layer_data


def _sample_dir() -> Path:
    d = Path(tempfile.gettempdir()) / "napari-vrpsam-med"
    try:
        d.mkdir(parents=True, exist_ok=True)
        if os.access(d, os.W_OK):
            return d
    except OSError:
        pass
    return Path(tempfile.mkdtemp(prefix="napari-vrpsam-med-"))  # shared temp dir not writable


def make_sample_data() -> list[LayerData]:
    """npe2 sample-data hook: the sample scan as one Image layer."""
    _import_triton_isolated()  # see _reader: napari's GL context + late triton import segfaults
    from vrpsam_med.demo import demo_scan
    from vrpsam_med.io import load_volume

    path = demo_scan(_sample_dir())
    volume = load_volume(path)
    return volume_to_layer_data(volume, name="MNI152 T1 (sample)", source=path)
