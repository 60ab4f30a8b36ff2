"""Tiny real scans for fast engine tests: crops of the MNI152 T1 template bundled with nilearn.

``make_case`` writes a few axial slices (in-plane stride 2: ~99 x 117 px, 2 mm) of the template and
of nilearn's brain mask (label 1 = brain, label 2 = the lateral-ventricle-ish dark core) as NIfTI.
Other "patients" are shifted / mirrored copies. No network, no ../shared/data.
"""
from __future__ import annotations

import functools
from pathlib import Path

import nibabel as nib
import numpy as np


@functools.lru_cache(maxsize=1)
def _template() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    from nilearn.datasets import load_mni152_brain_mask, load_mni152_template

    img = load_mni152_template(resolution=1)
    mask = load_mni152_brain_mask(resolution=1)
    return (np.asarray(img.dataobj, np.float32), np.asarray(mask.dataobj) > 0, np.asarray(img.affine, np.float64))


def make_case(folder: Path, name: str, *, z0: int = 90, n_slices: int = 3, shift: int = 0, flip: bool = False,
              affine_flip: bool = False, labels: bool = True) -> tuple[Path, Path | None]:
    """Write ``name.nii.gz`` (and ``name_label.nii.gz``) into ``folder``; returns their paths.

    ``shift``: voxels the anatomy moves along x and y; ``flip``: mirror left-right (another patient);
    ``affine_flip``: store the same anatomy with a flipped voxel order (another source orientation).
    """
    data, brain, aff = _template()
    sl = (slice(None, None, 2), slice(None, None, 2), slice(z0, z0 + n_slices))
    img = data[sl].copy()
    lab = brain[sl].astype(np.uint8)
    core = lab.astype(bool) & (img < np.percentile(img[lab > 0], 15))
    lab[core] = 2
    if shift:
        img = np.roll(img, (shift, shift), axis=(0, 1))
        lab = np.roll(lab, (shift, shift), axis=(0, 1))
    if flip:
        img, lab = img[::-1].copy(), lab[::-1].copy()
    a = aff.copy()
    a[:3, :2] *= 2
    a[:3, 3] += aff[:3, 2] * z0
    if affine_flip:  # same world, voxel order reversed along x: a different source orientation
        img, lab = img[::-1].copy(), lab[::-1].copy()
        a = a @ np.array([[-1, 0, 0, img.shape[0] - 1], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], np.float64)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.nii.gz"
    nib.save(nib.Nifti1Image(img.astype(np.float32), a), str(path))
    label_path = None
    if labels:
        label_path = folder / f"{name}_label.nii.gz"
        nib.save(nib.Nifti1Image(lab, a), str(label_path))
    return path, label_path


def corrupt_scan(path: Path) -> Path:
    """A file that claims to be NIfTI but is not."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x1f\x8b not really a gzip stream" + bytes(range(200)))
    return path
