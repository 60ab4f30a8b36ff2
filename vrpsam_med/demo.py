"""The README's main job, on a real scan that ships inside a pip package (no network).

Scan: the MNI152 2009a T1 template (1 mm) bundled in the nilearn wheel; reference structure:
the brain, from nilearn's bundled MNI152 brain mask. The demo writes the scan as NIfTI, box-prompts
the backbone on the middle axial slice, and writes the mask (source geometry), a PNG overlay and a
JSON summary with the Dice against the bundled mask.
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np

from vrpsam_med.engine.box import box_segment
from vrpsam_med.evaluation.metrics import dice_3d
from vrpsam_med.io import load_volume
from vrpsam_med.io.atomic import atomic_write
from vrpsam_med.io.intensity import intensity_range, to_unit_range
from vrpsam_med.io.outputs import write_json, write_mask, write_overlay
from vrpsam_med.io.volume import Volume, get_slice
from vrpsam_med.models.cache import EmbeddingCache
from vrpsam_med.prompts import mask_box

DEMO_SCAN = "mni152_t1.nii.gz"


def _save_nifti(img, out: Path, overwrite: bool = True) -> None:
    import nibabel as nib

    with atomic_write(out, overwrite=overwrite) as tmp:
        nib.save(img, str(tmp))


def demo_scan(folder: str | Path | None = None) -> Path:
    """Write the bundled MNI152 T1 template to ``folder`` (a temp dir by default) and return its path."""
    from nilearn.datasets import load_mni152_template

    folder = Path(folder) if folder is not None else Path(tempfile.mkdtemp(prefix="vrpsam_demo_"))
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / DEMO_SCAN
    if not path.exists():
        _save_nifti(load_mni152_template(resolution=1), path)
    return path


def demo_case(folder: str | Path | None = None) -> tuple[Volume, np.ndarray, int]:
    """(volume, integer labels in canonical order, label value) for the demo: 1 = brain."""
    import nibabel as nib
    from nilearn.datasets import load_mni152_brain_mask

    path = demo_scan(folder)
    volume = load_volume(path, modality="MR")
    mask_path = Path(tempfile.mkdtemp(prefix="vrpsam_demo_mask_")) / "brain.nii.gz"
    mask_img = load_mni152_brain_mask(resolution=1)
    nib.save(nib.Nifti1Image(np.asarray(mask_img.dataobj, np.uint8), mask_img.affine), str(mask_path))
    labels = np.rint(load_volume(mask_path).array).astype(np.int16)
    return volume, labels, 1


def run_demo(out: str | Path, cache: EmbeddingCache, overwrite: bool = False) -> int:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    volume, labels, value = demo_case(out)
    k = volume.shape[2] // 2
    gt = get_slice(labels, k) == value
    box = mask_box(gt)
    result = box_segment(volume, {k: box}, cache)
    pred = get_slice(result.labels, k) > 0
    dice = dice_3d(pred, gt)
    mask_path, png_path = out / "brain_mask.nii.gz", out / "brain_overlay.png"
    write_mask(result.labels, volume, mask_path, {1: "brain"}, overwrite=overwrite)
    lo, hi = intensity_range(volume)
    write_overlay(to_unit_range(get_slice(volume.array, k), lo, hi), pred.astype(np.uint8), png_path, box=box,
                  overwrite=overwrite)
    summary = {"scan": str(volume.source), "structure": "brain", "axial_slice": k, "box_xyxy": box.tolist(),
               "dice_vs_bundled_mask": dice, "predicted_iou": result.scores[k], "backbone": cache.backbone.id,
               "seconds": time.perf_counter() - t0}
    write_json(summary, out / "summary.json", overwrite=overwrite)
    print(f"demo: brain on axial slice {k} of {volume.source.name}: Dice {dice:.3f} vs the bundled mask "
          f"({summary['seconds']:.1f} s)")
    for p in (volume.source, mask_path, png_path, out / "summary.json"):
        print(f"  {p}")
    return 0
