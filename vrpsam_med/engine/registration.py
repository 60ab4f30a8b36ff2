"""Registration-based label propagation with SimpleITK: the classic atlas baseline, and the
engine's registration prior for localising a structure in another patient.

The support (atlas) image is registered to the query image (affine, optionally followed by a
B-spline deformable stage; Mattes mutual information, multi-resolution) and the support's label
is resampled onto the query grid with nearest-neighbour interpolation.
"""
from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from vrpsam_med.io.intensity import model_intensities
from vrpsam_med.io.volume import Volume


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


def register(fixed: Volume, moving: Volume, deformable: bool = False, seed: int = 1) -> sitk.Transform:
    """Transform mapping ``fixed`` (query) physical points into ``moving`` (support) space.

    ``seed`` fixes the metric's random sampling (SimpleITK reads 0 as "seed from the clock").
    """
    f = sitk.Cast(_image(fixed, model_intensities(fixed)), sitk.sitkFloat32)
    m = sitk.Cast(_image(moving, model_intensities(moving)), sitk.sitkFloat32)
    init = sitk.CenteredTransformInitializer(f, m, sitk.AffineTransform(3),
                                             sitk.CenteredTransformInitializerFilter.MOMENTS)
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMattesMutualInformation(32)
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    reg.SetMetricSamplingPercentage(0.05, seed)
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetOptimizerAsRegularStepGradientDescent(2.0, 1e-4, 200, relaxationFactor=0.7)
    reg.SetOptimizerScalesFromPhysicalShift()
    # multi-resolution pyramid, without levels that would shrink the thinnest axis below 4 voxels
    small = min(min(f.GetSize()), min(m.GetSize()))
    pyramid = [(sf, sig) for sf, sig in ((4, 2), (2, 1)) if small // sf >= 4] + [(1, 0)]
    reg.SetShrinkFactorsPerLevel([sf for sf, _ in pyramid])
    reg.SetSmoothingSigmasPerLevel([sig for _, sig in pyramid])
    reg.SetInitialTransform(init, inPlace=False)
    affine = reg.Execute(f, m)
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
