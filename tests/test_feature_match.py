"""Few-slice stacks: the reference structure placed in another stack by matching embeddings."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from vrpsam_med.engine.feature_match import dihedral, match_stack, oriented_volume, place, warp_stack
from vrpsam_med.evaluation.metrics import dice_3d
from vrpsam_med.io.volume import Volume, get_slice


def _features(seed: int, channels: int = 16) -> np.ndarray:
    """Smooth random (C, 64, 64) features: neighbouring cells alike, distant ones not (like an encoder's)."""
    noise = np.random.default_rng(seed).normal(size=(channels, 64, 64))
    return np.stack([ndimage.gaussian_filter(c, 2.0) for c in noise]).astype(np.float32)


def test_match_finds_orientation_slice_and_shift_and_carries_the_masks():
    ref = _features(0)
    mask = np.zeros((256, 256), bool)
    mask[80:120, 100:148] = True  # 4 px per embedding cell
    ref_masks = np.stack([np.zeros_like(mask), mask, mask, np.zeros_like(mask)])  # 4 slices, structure on 1-2
    turned = np.roll(dihedral(ref, 3), (5, -7), (1, 2))  # the target: orientation 3, moved 5 / -7 cells
    target = np.stack([_features(i + 1) for i in range(5)])
    target[2] = turned
    match = match_stack(torch.from_numpy(target), lambda i: torch.from_numpy(dihedral(ref, i).copy()), mask,
                        (256, 256), reference_slice=1, reference_slices=4)
    assert (match.slice, match.orientation) == (2, 3)
    assert match.zoom == pytest.approx(1.0) and match.score > 0.9
    expected = np.roll(dihedral(mask, 3), (20, -28), (0, 1))
    assert dice_3d(place(mask, match, (256, 256)), expected) > 0.95
    warped = warp_stack(ref_masks, match, 1, (5, 256, 256))
    # target slice 2 <- reference slice 1; slices follow by relative position (ratio 3/4)
    assert warped[2].any() and warped[3].any() and not warped[0].any()


def test_match_refuses_an_empty_reference():
    with pytest.raises(ValueError, match="empty"):
        match_stack(torch.zeros(3, 8, 64, 64), lambda i: torch.zeros(8, 64, 64), np.zeros((64, 64), bool),
                    (64, 64), 1, 3)


@pytest.mark.parametrize("axis", [0, 1, 2])
@pytest.mark.parametrize("i", range(8))
def test_oriented_volume_shows_its_slices_turned(i, axis):
    arr = np.random.default_rng(1).normal(size=(6, 9, 4)).astype(np.float32)
    vol = Volume(arr, np.diag([1.0, 1.0, 5.0, 1.0]), modality="MR")
    turned = oriented_volume(vol, i, axis)
    for k in range(arr.shape[axis]):
        np.testing.assert_array_equal(get_slice(turned.array, k, axis), dihedral(get_slice(arr, k, axis), i))
    assert turned.modality == "MR" and (i == 0) == (turned.digest() == vol.digest())
