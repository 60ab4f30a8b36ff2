"""napari plugin for vrpsam-med: a reader for medical scans and a sample scan.

All loading goes through the library's public API (:func:`vrpsam_med.io.load_volume`);
this package only turns a :class:`~vrpsam_med.io.volume.Volume` into napari layer data.
"""
from __future__ import annotations

__version__ = "0.1.0"

from napari_vrpsam_med._reader import get_reader, volume_to_layer_data
from napari_vrpsam_med._sample_data import make_sample_data

__all__ = ["get_reader", "make_sample_data", "volume_to_layer_data", "__version__"]
