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


def _body_section(first: int, count: int, seed: int) -> Volume:
    """``count`` 4 mm slices from ``first`` of a 100-slice trunk: dark lungs, then a bright organ, then a
    plain belly, then a bright pelvis; world z = slice x 4 mm, so both sections share one world frame."""
    z = np.arange(first, first + count)
    x, y = np.mgrid[:64, :64]
    body = ((x - 32) / 26) ** 2 + ((y - 32) / 20) ** 2 <= 1
    img = np.zeros((64, 64, count), np.float32)
    for i, k in enumerate(z):
        s = np.where(body, 90.0, 0.0)
        if k < 30:  # lungs, two dark lobes
            lobe = lambda cx: ((x - cx) / 9) ** 2 + ((y - 32) / 12) ** 2 <= 1  # noqa: E731
            s[lobe(20) | lobe(44)] = 15
        elif k < 50:  # an organ on one side
            s[((x - 22) / 12) ** 2 + ((y - 30) / 10) ** 2 <= 1] = 200
        elif k >= 80:  # a pelvic ring
            r = ((x - 32) / 20) ** 2 + ((y - 32) / 15) ** 2
            s[(r <= 1) & (r >= 0.6)] = 255
        img[:, :, i] = s
    img += np.random.default_rng(seed).normal(0, 5, img.shape).astype(np.float32)
    affine = np.diag([-2.0, -2.0, 4.0, 1.0])
    affine[2, 3] = 4.0 * first
    return Volume(img, affine, modality="CT")


def test_axial_starts_align_scans_whose_fields_of_view_differ():
    # fixed: chest to belly (slices 0-59); moving: lung bases to pelvis (20-99). Their centres of mass
    # are ~120 mm apart along the body, so the plain start aligns the wrong anatomy.
    fixed, moving = _body_section(0, 60, 0), _body_section(20, 80, 1)
    organ = (0.0, 0.0, 4.0 * 40)  # world z of the organ's middle, the same point in both scans
    errors = {}
    for starts in ((), registration.AXIAL_STARTS_MM):
        tx = registration.register(fixed, moving, transform="similarity", axial_starts_mm=starts)
        errors[bool(starts)] = abs(tx.TransformPoint(organ)[2] - organ[2])
    assert errors[True] < 12.0, errors  # within 3 slices
    assert errors[False] > 40.0, errors  # the case the starts are for (if this passes, the test shows nothing)


def test_a_shifted_start_must_beat_the_plain_start_clearly():
    f, m, init = registration.registration_images(_body_section(0, 60, 0), _body_section(20, 80, 1))
    z0 = init.GetTranslation()[2]
    shifts = {}
    for gain in (registration.AXIAL_START_MIN_GAIN, 10.0):  # 10: no shift can lower the metric by 1,000 %
        start = registration._best_axial_start(f, m, init, 1, registration.AXIAL_STARTS_MM, 4, min_gain=gain)
        shifts[gain] = start.GetTranslation()[2] - z0
    assert shifts[10.0] == 0.0, shifts
    assert abs(shifts[registration.AXIAL_START_MIN_GAIN]) >= 40.0, shifts  # the wrong-anatomy case is fixed


def test_a_shifted_start_is_kept_only_if_it_also_registers_better(monkeypatch):
    # same field of view: the plain start is right. Force the coarse choice to a wrong 120 mm shift.
    fixed, moving = _body_section(0, 60, 0), _body_section(0, 60, 1)
    organ = (0.0, 0.0, 4.0 * 40)

    def wrong_shift(f, m, init, *args, **kwargs):
        return registration.shifted_along_z(init, 120.0)

    f, m, init = registration.registration_images(fixed, moving)
    stuck = registration._affine_method(wrong_shift(f, m, init), 1, 0.05, 200, [(4, 2), (2, 1), (1, 0)]).Execute(f, m)
    assert abs(stuck.TransformPoint(organ)[2] - organ[2]) > 40.0  # from that start alone it ends wrong
    monkeypatch.setattr(registration, "_best_axial_start", wrong_shift)
    tx = registration.register(fixed, moving, transform="similarity", axial_starts_mm=registration.AXIAL_STARTS_MM)
    assert abs(tx.TransformPoint(organ)[2] - organ[2]) < 12.0
