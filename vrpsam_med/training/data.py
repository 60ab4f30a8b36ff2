"""Training slices prepared once per case: model-space masks, 3D supervoxels, embedding files.

A :class:`CaseRecord` holds, for every axial slice of one training volume, its integer label map
and its supervoxel map in the 256-px model space (resized + padded like the backbone input, see
``vrpsam_med.models.backbones``), and the path of its cached embedding. Records are saved as
``.npz`` next to the embedding cache, so preparation runs once per case and backbone.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from vrpsam_med.io.msd import Case, MSDDataset
from vrpsam_med.io.volume import Volume, get_slice
from vrpsam_med.models.backbones import LOW_RES, SliceGeometry
from vrpsam_med.models.cache import EmbeddingCache

log = logging.getLogger(__name__)
SUPERVOXELS_PER_VOLUME = 400


@dataclass
class CaseRecord:
    """One training volume, axial slices only."""

    dataset: str
    case_id: str
    label_names: dict[int, str]
    labels: np.ndarray  # (S, 256, 256) int16, model space
    supervoxels: np.ndarray  # (S, 256, 256) int32, model space; 0 = background/outside body
    embeddings: list[Path]  # S cached embedding files (float16 (256, 64, 64))

    @property
    def num_slices(self) -> int:
        return self.labels.shape[0]

    def embedding(self, k: int) -> np.ndarray:
        return np.load(self.embeddings[k], allow_pickle=False)


def to_model_space(slices: np.ndarray, size: int = LOW_RES) -> np.ndarray:
    """(S, H, W) integer maps -> (S, size, size), nearest-neighbour resized and zero-padded like the image."""
    geom = SliceGeometry(slices.shape[1], slices.shape[2], size)
    h, w = geom.resized
    t = torch.from_numpy(slices.astype(np.float32))[:, None]
    t = F.interpolate(t, size=(h, w), mode="nearest")
    t = F.pad(t, (0, size - w, 0, size - h))
    return t[:, 0].numpy().astype(slices.dtype)


def supervoxels(volume: Volume, unit: np.ndarray, n_segments: int = SUPERVOXELS_PER_VOLUME) -> np.ndarray:
    """3D SLIC supervoxels (SSL-ALPNet-style pseudo-structures), on a 2x in-plane downsampled copy.

    ``unit`` is the volume in [0, 1] (model intensities). Voxels of the background (air) get 0.
    """
    from scipy import ndimage
    from skimage.segmentation import slic

    small = unit[::2, ::2, :]
    body = ndimage.binary_opening(small > 0.05, iterations=2)
    if not body.any():  # very thin volumes: the 3D opening erodes everything
        body = small > 0.05
    if not body.any():
        return np.zeros(unit.shape, np.int32)
    sx, sy, sz = volume.spacing
    seg = slic(small, n_segments=n_segments, compactness=0.1, spacing=(2 * sx, 2 * sy, sz), channel_axis=None,
               start_label=1, mask=body)
    full = np.repeat(np.repeat(seg, 2, axis=0), 2, axis=1)[: unit.shape[0], : unit.shape[1], :]
    return full.astype(np.int32)


def prepare_case(ds: MSDDataset, case: Case, cache: EmbeddingCache, out_dir: Path) -> CaseRecord:
    """Encode every axial slice (cached), compute model-space labels and supervoxels (saved).
    A case without a label volume gets all-background labels: only its supervoxels become episodes."""
    from vrpsam_med.io.intensity import model_intensities

    volume, labels = ds.load(case)
    if labels is None:  # an unlabelled case still gives supervoxel episodes (self-supervised targets)
        labels = np.zeros(volume.shape, np.int16)
    n = volume.shape[2]
    paths = cache.paths(volume, range(n), "axial")
    record_path = out_dir / f"{ds.name}__{case.case_id}__{volume.digest()}.npz"
    if record_path.exists():
        z = np.load(record_path, allow_pickle=False)
        lab, sv = z["labels"], z["supervoxels"]
    else:
        unit = model_intensities(volume)
        sv3d = supervoxels(volume, unit)
        lab = to_model_space(np.stack([get_slice(labels, k) for k in range(n)]).astype(np.int16))
        sv = to_model_space(np.stack([get_slice(sv3d, k) for k in range(n)]))
        out_dir.mkdir(parents=True, exist_ok=True)
        tmp = record_path.with_suffix(f".{os.getpid()}.tmp.npz")  # unique per process (torchrun)
        np.savez_compressed(tmp, labels=lab, supervoxels=sv)
        tmp.replace(record_path)
    return CaseRecord(ds.name, case.case_id, dict(ds.labels), lab, sv, paths)
