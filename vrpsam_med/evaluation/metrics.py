"""Segmentation metrics (MONAI's implementations, on boolean numpy volumes)."""
from __future__ import annotations

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
