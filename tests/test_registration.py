"""Registration (atlas baseline and the engine's prior): reproducible transforms."""
from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from vrpsam_med.engine import registration
from vrpsam_med.io.volume import Volume


def _blob(shift: float, seed: int) -> Volume:
    shape = (96, 96, 40)
    x, y, z = np.mgrid[: shape[0], : shape[1], : shape[2]]
    body = ((x - 48 - shift) / 36) ** 2 + ((y - 46) / 30) ** 2 <= 1
    organ = ((x - 40 - shift) / 14) ** 2 + ((y - 50) / 10) ** 2 + ((z - 20) / 12) ** 2 <= 1
    img = np.where(organ, 200.0, np.where(body, 90.0, 0.0)) + np.random.default_rng(seed).normal(0, 6, shape)
    return Volume(img.astype(np.float32), np.diag([-1.2, -1.2, 3.0, 1.0]), modality="MR")


def test_register_is_reproducible_and_restores_itk_threads(monkeypatch):
    fixed, moving = _blob(0, 0), _blob(5, 1)
    threads_before = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    seen = []
    real = registration._register
    monkeypatch.setattr(registration, "_register", lambda *a, **k: seen.append(
        sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()) or real(*a, **k))
    runs = [registration.register(fixed, moving).GetParameters() for _ in range(3)]
    assert seen == [1, 1, 1]  # ITK's threaded sums are order-dependent: one thread makes them reproducible
    assert runs[0] == runs[1] == runs[2]
    assert sitk.ProcessObject.GetGlobalDefaultNumberOfThreads() == threads_before
    # the shift is found (the moving organ sits 5 voxels = 6 mm further along x)
    offset = registration.register(fixed, moving).TransformPoint((0.0, 0.0, 0.0))
    assert abs(abs(offset[0]) - 6.0) < 2.0, offset


def test_similarity_transform_finds_the_shift_and_unknown_kinds_are_refused():
    import pytest

    fixed, moving = _blob(0, 0), _blob(5, 1)
    tx = registration.register(fixed, moving, transform="similarity")
    assert len(tx.GetParameters()) == 7  # versor (3), translation (3), one scale
    offset = tx.TransformPoint((0.0, 0.0, 0.0))
    assert abs(abs(offset[0]) - 6.0) < 2.0, offset
    with pytest.raises(ValueError, match="unknown registration transform 'bspline'"):
        registration.register(fixed, moving, transform="bspline")
