"""Segmentation metrics (MONAI's implementations, on boolean numpy volumes)."""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import torch
from monai.metrics import compute_dice, compute_hausdorff_distance


def dice_3d(pred: np.ndarray, gt: np.ndarray) -> float:
    """Dice of two boolean volumes; 1.0 when both are empty."""
    pred, gt = np.asarray(pred, bool), np.asarray(gt, bool)
    if not pred.any() and not gt.any():
        return 1.0
    p = torch.from_numpy(pred)[None, None].float()
    g = torch.from_numpy(gt)[None, None].float()
    return float(compute_dice(p, g, include_background=True, ignore_empty=False)[0, 0])


def hd95(pred: np.ndarray, gt: np.ndarray, spacing: tuple[float, ...] | None = None) -> float:
    """95th-percentile Hausdorff distance in mm (voxels when no spacing); inf if one side is empty."""
    pred, gt = np.asarray(pred, bool), np.asarray(gt, bool)
    if not pred.any() or not gt.any():
        return 0.0 if pred.any() == gt.any() else float("inf")
    p = torch.from_numpy(pred)[None, None].float()
    g = torch.from_numpy(gt)[None, None].float()
    return float(compute_hausdorff_distance(p, g, include_background=True, percentile=95, spacing=spacing)[0, 0])


@dataclass(frozen=True)
class FalseMasks:
    """Slices without the structure that got a mask, pooled over volumes (see :func:`pool_false_masks`)."""

    given_a_mask: float  # with ``counted`` False: the sum of per-volume shares
    empty: float  # with ``counted`` False: the number of volumes with a share
    counted: bool = True  # False: some volume predates the counts, and share is the mean of per-volume shares

    @property
    def share(self) -> float | None:
        return self.given_a_mask / self.empty if self.empty else None

    def __str__(self) -> str:
        if not self.empty:
            return "no empty slices" if self.counted else "-"
        if not self.counted:
            return f"{self.share:.3f} (mean per volume)"
        return f"{self.given_a_mask:.0f} / {self.empty:.0f} = {self.share:.3f}"


def pool_false_masks(cases: Iterable[Mapping]) -> FalseMasks:
    """Pool ``empty_slices_given_a_mask`` over ``empty_slices`` of the ``volume`` protocol's cases.

    Pooled, not averaged per volume: a volume without empty slices has no share, and counting it as 0
    hides the false masks of the volumes that have some. Cases written before the counts existed hold only
    ``empty_slices_with_false_mask`` (a share, or None): each such share then counts once."""
    k = n = 0.0
    counted = True
    for c in cases:
        if "empty_slices" in c:
            k, n = k + c["empty_slices_given_a_mask"], n + c["empty_slices"]
        elif c.get("empty_slices_with_false_mask") is not None:
            k, n, counted = k + c["empty_slices_with_false_mask"], n + 1, False
    return FalseMasks(k, n, counted)
