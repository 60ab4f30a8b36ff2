"""Registration-based label propagation with SimpleITK: the classic atlas baseline, and the
engine's registration prior for localising a structure in another patient.

The support (atlas) image is registered to the query image (affine, optionally followed by a
B-spline deformable stage; Mattes mutual information, multi-resolution) and the support's label
is resampled onto the query grid with nearest-neighbour interpolation.

Registrations run with one ITK thread: with several, ITK's threaded sums (moments, Mattes mutual
information) are added in a varying order, the same pair gave transforms that differed by up to 1e-4
from call to call, and the engine's masks (and a fine-tuning run's validation Dice) were not
reproducible. ``REGISTRATION_THREADS = None`` restores ITK's default (faster, not bit-reproducible).
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import SimpleITK as sitk

from vrpsam_med.engine.feature_match import dihedral as _dihedral
from vrpsam_med.io.intensity import model_intensities
from vrpsam_med.io.volume import Volume, from_shown_slices, shown_slices, slice_shape

REGISTRATION_THREADS: int | None = 1


@contextlib.contextmanager
def _reproducible_threads() -> Iterator[None]:
    """ITK's global default thread count set to :data:`REGISTRATION_THREADS` for the block, then restored."""
    if REGISTRATION_THREADS is None:
        yield
        return
    before = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(REGISTRATION_THREADS)
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(before)


def _image(volume: Volume, array: np.ndarray) -> sitk.Image:
    """Canonical (X, Y, Z) array -> SimpleITK image with the volume's geometry (LPS world)."""
    img = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(array, (2, 1, 0))))
    aff = volume.affine.copy()
    aff[:2] *= -1  # RAS -> LPS world
    spacing = np.linalg.norm(aff[:3, :3], axis=0)
    img.SetSpacing([float(s) for s in spacing])
    img.SetDirection([float(v) for v in (aff[:3, :3] / spacing).ravel()])
    img.SetOrigin([float(v) for v in aff[:3, 3]])
    return img


def _affine_method(init: sitk.Transform, seed: int, sampling: float, iterations: int,
                   pyramid: list[tuple[int, int]]) -> sitk.ImageRegistrationMethod:
    """Mattes MI + regular-step gradient descent from ``init``; pyramid = (shrink, sigma) per level."""
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMattesMutualInformation(32)
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    reg.SetMetricSamplingPercentage(sampling, seed)
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetOptimizerAsRegularStepGradientDescent(2.0, 1e-4, iterations, relaxationFactor=0.7)
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetShrinkFactorsPerLevel([sf for sf, _ in pyramid])
    reg.SetSmoothingSigmasPerLevel([sig for _, sig in pyramid])
    reg.SetInitialTransform(init, inPlace=False)
    return reg


TRANSFORMS = ("affine", "similarity")
# shifts along the body tried by ``register(axial_starts_mm=...)`` in the engine and benchmarks
AXIAL_STARTS_MM = tuple(float(d) for d in range(-200, 201, 40) if d)
# a shifted start must lower the coarse metric by this share of the plain start's (BTCV `train`, stop 38:
# shifts that fixed a wrong field-of-view match gained 15-39 %, the one that moved a good prior 5 %)
AXIAL_START_MIN_GAIN = 0.1


def register(fixed: Volume, moving: Volume, deformable: bool = False, seed: int = 1,
             transform: str = "affine", axial_starts_mm: tuple[float, ...] = ()) -> sitk.Transform:
    """Transform mapping ``fixed`` (query) physical points into ``moving`` (support) space.

    ``transform``: "affine" (12 parameters) or "similarity" (rotation, translation, one scale: 7),
    both initialised at the images' intensity centres of mass. ``axial_starts_mm``: also start from
    the centres of mass shifted by these distances along the world's head-feet axis, each refined
    briefly at the coarsest level; the best one, if it beats the plain start by
    :data:`AXIAL_START_MIN_GAIN`, is registered fully too and kept if it ends at a lower metric than the plain
    start's registration (scans with another field of view: their centres of mass differ along the body by
    up to ~200 mm). ``seed`` fixes the metric's random sampling (SimpleITK reads 0 as "seed from the clock");
    with :data:`REGISTRATION_THREADS` = 1 the same pair always gives the same transform.
    """
    if transform not in TRANSFORMS:
        raise ValueError(f"unknown registration transform {transform!r}; use one of {', '.join(TRANSFORMS)}")
    with _reproducible_threads():
        return _register(fixed, moving, deformable, seed, transform, tuple(axial_starts_mm))


def _middle_column(img: sitk.Image, k: float) -> tuple[float, float, float]:
    """World point of continuous index (middle x, middle y, ``k``)."""
    return img.TransformContinuousIndexToPhysicalPoint(((img.GetSize()[0] - 1) / 2, (img.GetSize()[1] - 1) / 2, k))


def _z_range(img: sitk.Image) -> tuple[float, float]:
    """World z (head-feet) range of an image's voxel centres, through its middle column."""
    a, b = (_middle_column(img, float(k))[2] for k in (0, img.GetSize()[2] - 1))
    return min(a, b), max(a, b)


def _axial_overlap(tx: sitk.Transform, f: sitk.Image, m: sitk.Image) -> float:
    """Share of the shorter scan's length along z that overlaps the other once ``tx`` maps fixed into moving."""
    lo, hi = _z_range(f)
    cx, cy = _middle_column(f, 0.0)[:2]
    a, b = (tx.TransformPoint((cx, cy, z))[2] for z in (lo, hi))
    mlo, mhi = _z_range(m)
    shorter = min(hi - lo, mhi - mlo)
    return max(0.0, min(max(a, b), mhi) - max(min(a, b), mlo)) / shorter if shorter > 0 else 1.0


def shifted_along_z(tx: sitk.Transform, dz: float) -> sitk.Transform:
    """A copy of ``tx`` (a transform with a translation) with ``dz`` mm added to its world-z translation."""
    out = tx.__class__(tx)
    x, y, z = out.GetTranslation()
    out.SetTranslation((x, y, z + float(dz)))
    return out


def registration_images(fixed: Volume, moving: Volume, transform: str = "similarity"
                        ) -> tuple[sitk.Image, sitk.Image, sitk.Transform]:
    """The float images the registration compares (model intensities) and its start: ``transform``'s kind
    centred at the images' intensity centres of mass."""
    f = sitk.Cast(_image(fixed, model_intensities(fixed)), sitk.sitkFloat32)
    m = sitk.Cast(_image(moving, model_intensities(moving)), sitk.sitkFloat32)
    kind = sitk.AffineTransform(3) if transform == "affine" else sitk.Similarity3DTransform()
    return f, m, sitk.CenteredTransformInitializer(f, m, kind, sitk.CenteredTransformInitializerFilter.MOMENTS)


def _best_axial_start(f: sitk.Image, m: sitk.Image, init: sitk.Transform, seed: int,
                      starts_mm: tuple[float, ...], shrink: int, min_overlap: float = 0.5,
                      min_gain: float = AXIAL_START_MIN_GAIN) -> sitk.Transform:
    """``init`` or ``init`` shifted along world z by one of ``starts_mm``, after a short coarse-level
    registration from each. Shifts that leave less than ``min_overlap`` of the shorter scan overlapping the
    other are dropped (a sliver of overlap can score well by chance). The best shift (lowest metric,
    negative mutual information) replaces ``init`` only if its metric beats ``init``'s by ``min_gain``
    (relative): a few per cent lower from a shifted start was noise on BTCV and moved a good prior away."""
    scored: list[tuple[float, float, sitk.Transform]] = []
    for dz in (0.0, *starts_mm):
        start = shifted_along_z(init, dz)
        reg = _affine_method(start, seed, 0.05, 30, [(shrink, shrink / 2)])
        try:
            out = reg.Execute(f, m)
        except RuntimeError:  # too little overlap at this shift
            continue
        if _axial_overlap(out, f, m) >= min_overlap:
            scored.append((float(dz), reg.GetMetricValue(), start))
    plain = next((metric for dz, metric, _ in scored if dz == 0.0), None)
    shifted = [s for s in scored if s[0] != 0.0]
    if not shifted:
        return init
    _, metric, start = min(shifted, key=lambda s: s[1])
    if plain is None or metric < plain - min_gain * abs(plain):
        return start
    return init


def _register(fixed: Volume, moving: Volume, deformable: bool, seed: int, transform: str,
              axial_starts_mm: tuple[float, ...]) -> sitk.Transform:
    f, m, init = registration_images(fixed, moving, transform)
    # multi-resolution pyramid, without levels that would shrink the thinnest axis below 4 voxels
    small = min(min(f.GetSize()), min(m.GetSize()))
    pyramid = [(sf, sig) for sf, sig in ((4, 2), (2, 1)) if small // sf >= 4] + [(1, 0)]
    reg = _affine_method(init, seed, 0.05, 200, pyramid)
    affine = reg.Execute(f, m)
    if axial_starts_mm:
        start = _best_axial_start(f, m, init, seed, axial_starts_mm, pyramid[0][0])
        if start is not init:
            # the coarse metric alone chose a wrong shift in MR scans whose fields of view agree (CHAOS train):
            # keep the shifted registration only if it also ends better at full resolution
            shifted = _affine_method(start, seed, 0.05, 200, pyramid)
            moved = shifted.Execute(f, m)
            if shifted.GetMetricValue() < reg.GetMetricValue():
                affine = moved
    if not deformable:
        return affine
    mesh = [6, 6, 4]
    bspline = sitk.BSplineTransformInitializer(f, mesh)
    reg2 = sitk.ImageRegistrationMethod()
    reg2.SetMetricAsMattesMutualInformation(32)
    reg2.SetMetricSamplingStrategy(reg2.RANDOM)
    reg2.SetMetricSamplingPercentage(0.05, seed)
    reg2.SetInterpolator(sitk.sitkLinear)
    reg2.SetOptimizerAsLBFGSB(gradientConvergenceTolerance=1e-5, numberOfIterations=50)
    reg2.SetShrinkFactorsPerLevel([2, 1])
    reg2.SetSmoothingSigmasPerLevel([1, 0])
    reg2.SetMovingInitialTransform(affine)
    reg2.SetInitialTransform(bspline, inPlace=True)
    reg2.Execute(f, m)
    return sitk.CompositeTransform([affine, bspline])


def propagate_labels(fixed: Volume, moving: Volume, moving_labels: np.ndarray, transform: sitk.Transform
                     ) -> np.ndarray:
    """Resample ``moving_labels`` (canonical order) onto ``fixed``'s grid: (X, Y, Z) integer array."""
    lab = _image(moving, moving_labels.astype(np.int16))
    ref = _image(fixed, np.zeros(fixed.shape, np.int16))
    out = sitk.Resample(lab, ref, transform, sitk.sitkNearestNeighbor, 0, sitk.sitkInt16)
    return np.transpose(sitk.GetArrayFromImage(out), (2, 1, 0))


# -- few-slice stacks (cine MR short axis, thick-slice scans) ---------------------------------------
def _slab_image(stack: np.ndarray) -> sitk.Image:
    """(S, H, W) slices -> the 2D mean of the middle half of the stack, in pixel units."""
    s = stack.shape[0]
    lo, hi = s // 4, max(s // 4 + 1, (3 * s + 3) // 4)
    return sitk.GetImageFromArray(np.ascontiguousarray(stack[lo:hi].mean(0), dtype=np.float32))


def register_slab(fixed: np.ndarray, moving: np.ndarray, seed: int = 1) -> tuple[int, sitk.Transform]:
    """In-plane registration of two few-slice stacks (S, H, W) in [0, 1] -> (orientation, 2D affine).

    A 3D affine cannot be fitted to stacks of 6-10 thick slices (nor to stacks whose slice spacing
    was lost), and patients may come in different in-plane orientations. So the middle of each stack
    is averaged into one image, ``moving`` is tried in all 8 orientations (:func:`_dihedral`), each
    registered to ``fixed`` with a 2D affine (Mattes MI), and the best metric wins. The transform
    maps ``fixed`` pixel coordinates into the re-oriented ``moving`` image.
    """
    with _reproducible_threads():
        return _register_slab(fixed, moving, seed)


def _register_slab(fixed: np.ndarray, moving: np.ndarray, seed: int) -> tuple[int, sitk.Transform]:
    f = _slab_image(fixed)
    best: tuple[float, int, sitk.Transform] | None = None
    for i in range(8):
        m = _slab_image(_dihedral(moving, i))
        init = sitk.CenteredTransformInitializer(f, m, sitk.AffineTransform(2),
                                                 sitk.CenteredTransformInitializerFilter.MOMENTS)
        reg = _affine_method(init, seed, 0.2, 150, [(4, 2), (2, 1), (1, 0)])
        try:
            tx = reg.Execute(f, m)
        except RuntimeError:
            continue
        value = reg.GetMetricValue()  # negative mutual information: lower is better
        if best is None or value < best[0]:
            best = (value, i, tx)
    if best is None:
        raise RuntimeError("in-plane registration failed in every orientation")
    return best[1], best[2]


def propagate_slab_labels(fixed_shape: tuple[int, int, int], moving_labels: np.ndarray, orientation: int,
                          transform: sitk.Transform) -> np.ndarray:
    """Warp (S_m, H_m, W_m) labels onto (S_f, H_f, W_f) slices: slice k_f takes the moving slice at the
    same relative position along the stack, re-oriented and resampled with the 2D ``transform``."""
    s_f, h_f, w_f = fixed_shape
    s_m = moving_labels.shape[0]
    ref = sitk.Image(int(w_f), int(h_f), sitk.sitkInt16)
    out = np.zeros(fixed_shape, np.int16)
    for k in range(s_f):
        j = int(round(k * (s_m - 1) / max(s_f - 1, 1)))
        lab = sitk.GetImageFromArray(np.ascontiguousarray(_dihedral(moving_labels[j], orientation), dtype=np.int16))
        out[k] = sitk.GetArrayFromImage(sitk.Resample(lab, ref, transform, sitk.sitkNearestNeighbor, 0, sitk.sitkInt16))
    return out


def register_slab_volumes(fixed: Volume, moving: Volume, axis: int = 2, preset: str | None = None
                          ) -> tuple[int, sitk.Transform]:
    """:func:`register_slab` on two volumes' slices along ``axis``, in model intensities."""
    return register_slab(shown_slices(model_intensities(fixed, preset), axis),
                         shown_slices(model_intensities(moving, preset), axis))


def propagate_slab_volume(fixed: Volume, moving_labels: np.ndarray, transform: tuple[int, sitk.Transform],
                          axis: int = 2) -> np.ndarray:
    """``moving_labels`` (bool or int, on the moving volume's grid) -> bool on ``fixed``'s grid, with the
    (orientation, 2D transform) of :func:`register_slab_volumes`."""
    shape = (fixed.shape[axis], *slice_shape(fixed.shape, axis))
    slices = propagate_slab_labels(shape, shown_slices(moving_labels.astype(np.int16), axis), *transform)
    return from_shown_slices(slices > 0, axis)
