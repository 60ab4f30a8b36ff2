"""Plain SAM box prompting on slices of a volume (the backbone smoke path and the GT-box upper bound)."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from vrpsam_med.io.volume import Volume, axis_index, get_slice, set_slice, slice_shape
from vrpsam_med.models.backbones import SliceGeometry
from vrpsam_med.models.cache import EmbeddingCache
from vrpsam_med.prompts import Annotation, mask_box


@dataclass
class BoxResult:
    """Masks for the prompted slices, placed in a volume-shaped array (canonical order)."""

    labels: np.ndarray  # (X, Y, Z) uint8, 1 inside the mask on prompted slices
    scores: dict[int, float]  # slice index -> SAM's predicted IoU
    encoded: int  # slices sent through the image encoder during this call


def box_segment(volume: Volume, boxes: Mapping[int, np.ndarray], cache: EmbeddingCache,
                axis: str | int = "axial", preset: str | None = None, batch_size: int = 8) -> BoxResult:
    """Segment each slice ``k`` of ``boxes`` with its box ``x0, y0, x1, y1`` (slice pixels)."""
    ax = axis_index(axis)
    h, w = slice_shape(volume.shape, ax)
    for box in boxes.values():
        Annotation.from_box(box).validate((h, w))
    geom = SliceGeometry(h, w, cache.backbone.image_size)
    labels = np.zeros(volume.shape, dtype=np.uint8)
    scores: dict[int, float] = {}
    before = cache.encoded
    order = sorted(boxes)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        emb = cache.get(volume, chunk, ax, preset)
        logits, iou = cache.backbone.segment_boxes(emb, np.stack([boxes[k] for k in chunk]), geom)
        for k, lo, s in zip(chunk, logits, iou):
            set_slice(labels, k, (lo > 0).cpu().numpy().astype(np.uint8), ax)
            scores[k] = float(s)
    return BoxResult(labels=labels, scores=scores, encoded=cache.encoded - before)


def boxes_from_labels(labels: np.ndarray, value: int, axis: str | int = "axial") -> dict[int, np.ndarray]:
    """Tight box per slice of ``labels == value`` (ground-truth boxes for the upper-bound benchmark)."""
    ax = axis_index(axis)
    present = np.flatnonzero((labels == value).any(axis=tuple(i for i in range(3) if i != ax)))
    return {int(k): mask_box(get_slice(labels, int(k), ax) == value) for k in present}


