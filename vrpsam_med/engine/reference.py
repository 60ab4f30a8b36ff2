"""VRP-SAM inference: annotated reference slice(s) -> masks on target slices.

``ReferencePredictor`` is the one place where a trained VRP encoder meets cached embeddings; the
evaluation protocols, the CLI and (later) the volume engine call it.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from vrpsam_med.io.intensity import intensity_range, to_unit_range
from vrpsam_med.io.volume import Volume, axis_index, get_slice, slice_shape
from vrpsam_med.models.backbones import SliceGeometry
from vrpsam_med.models.cache import EmbeddingCache
from vrpsam_med.models.vrp import VRPSAM
from vrpsam_med.prompts import Annotation, grow_points


@dataclass
class Reference:
    """One annotated reference slice, ready for the VRP encoder."""

    embedding: torch.Tensor  # (256, 64, 64)
    mask: torch.Tensor  # (1, 256, 256) model-space rasterised annotation
    kind: str
    source: str  # "<volume name>:<axis>:<slice>" for reports


@dataclass
class SlicePrediction:
    masks: np.ndarray  # (N, H, W) bool, empty where the structure was judged absent
    presence: np.ndarray  # (N,) probability that the structure is in the slice
    iou: np.ndarray  # (N,) SAM's IoU estimate


def make_reference(cache: EmbeddingCache, volume: Volume, index: int, annotation: Annotation,
                   axis: str | int = "axial", preset: str | None = None) -> Reference:
    """Embed the reference slice (cached) and rasterise its annotation into the 256-px model space.

    Point discs are first grown over similar intensities (:func:`~vrpsam_med.prompts.grow_points`).
    """
    ax = axis_index(axis)
    h, w = slice_shape(volume.shape, ax)
    mask = annotation.to_mask((h, w))
    if annotation.kind == "point":
        lo, hi = intensity_range(volume, preset)
        mask = grow_points(mask, to_unit_range(get_slice(volume.array, index, ax), lo, hi))
    geom = SliceGeometry(h, w, cache.backbone.image_size)
    emb = cache.get(volume, [index], ax, preset)[0]
    m = geom.mask_to_model(torch.from_numpy(mask)[None])[0]
    return Reference(emb, (m > 0.5).float(), annotation.kind, f"{volume.name}:{ax}:{index}")


class ReferencePredictor:
    """Segment target slices from k references with a trained :class:`VRPSAM`."""

    def __init__(self, model: VRPSAM, cache: EmbeddingCache, presence_threshold: float = 0.5,
                 batch_size: int = 8) -> None:
        self.model = model.eval()
        self.cache = cache
        self.presence_threshold = presence_threshold
        self.batch_size = batch_size

    def reference(self, volume: Volume, index: int, annotation: Annotation, axis: str | int = "axial",
                  preset: str | None = None) -> Reference:
        return make_reference(self.cache, volume, index, annotation, axis, preset)

    @torch.inference_mode()
    def predict(self, references: Sequence[Reference], volume: Volume, indices: Sequence[int],
                axis: str | int = "axial", preset: str | None = None) -> SlicePrediction:
        """Masks for ``indices`` of ``volume`` (display orientation) from k ``references``."""
        ax = axis_index(axis)
        h, w = slice_shape(volume.shape, ax)
        geom = SliceGeometry(h, w, self.cache.backbone.image_size)
        device = self.cache.backbone.device
        ref_e = torch.stack([r.embedding for r in references]).to(device)  # (k, C, 64, 64)
        ref_m = torch.stack([r.mask for r in references]).to(device)  # (k, 1, 256, 256)
        # same precision policy as the encoder (bf16 autocast by default; the model was trained so)
        dtype = self.cache.backbone._autocast_dtype()
        autocast = torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)
        with autocast:
            state = self.model.reference_state(ref_e, ref_m)  # once per call, reused for every target
        masks, pres, ious = [], [], []
        for start in range(0, len(indices), self.batch_size):
            chunk = list(indices[start:start + self.batch_size])
            tgt = self.cache.get(volume, chunk, ax, preset).to(device)
            with autocast:
                logits, iou, presence = self.model.predict_with_state(state, tgt)
            p = torch.sigmoid(presence.float())
            m = geom.logits_to_slice(logits.float()) > 0
            m &= (p >= self.presence_threshold)[:, None, None]
            masks.append(m.cpu().numpy())
            pres.append(p.cpu().numpy())
            ious.append(iou.float().cpu().numpy())
        return SlicePrediction(np.concatenate(masks), np.concatenate(pres), np.concatenate(ious))


def slice_masks(volume_labels: np.ndarray, value: int, indices: Sequence[int], axis: str | int = "axial"
                ) -> np.ndarray:
    """(N, H, W) boolean masks of ``value`` on ``indices`` (display orientation)."""
    return np.stack([get_slice(volume_labels, int(k), axis) == value for k in indices])
