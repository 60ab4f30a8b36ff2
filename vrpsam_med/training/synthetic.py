"""A tiny synthetic MSD folder (for tests, the fine-tuning notebook and smoke runs; no real data).

Each case is an MR-like volume (X, Y, Z) with two ellipsoids ("organ" brighter, "lesion" darker)
on a noisy body disc; patient ``k`` is shifted and scaled a little, so cases differ like patients.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def write_synthetic_msd(root: str | Path, n_patients: int = 5, shape: tuple[int, int, int] = (64, 64, 8),
                        seed: int = 0) -> Path:
    """Write ``root/dataset.json``, ``imagesTr/case_XX.nii.gz`` and ``labelsTr/case_XX.nii.gz``; returns root."""
    import nibabel as nib

    root = Path(root)
    (root / "imagesTr").mkdir(parents=True, exist_ok=True)
    (root / "labelsTr").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    x, y, z = np.meshgrid(*(np.arange(s, dtype=np.float32) for s in shape), indexing="ij")
    cx, cy, cz = (s / 2 for s in shape)
    training = []
    for k in range(n_patients):
        dx, dy = rng.uniform(-4, 4, size=2)
        s = rng.uniform(0.85, 1.15)
        body = ((x - cx) / (0.45 * shape[0])) ** 2 + ((y - cy) / (0.4 * shape[1])) ** 2 < 1
        organ = (((x - cx + 8 + dx) / (10 * s)) ** 2 + ((y - cy + dy) / (8 * s)) ** 2
                 + ((z - cz) / (0.35 * shape[2])) ** 2) < 1
        lesion = (((x - cx - 12 - dx) / (5 * s)) ** 2 + ((y - cy - 6) / (5 * s)) ** 2
                  + ((z - cz) / (0.3 * shape[2])) ** 2) < 1
        img = 100 * body + 200 * organ - 60 * lesion * body + rng.normal(0, 8, shape)
        lab = np.zeros(shape, np.int16)
        lab[organ] = 1
        lab[lesion & ~organ] = 2
        affine = np.diag([1.5, 1.5, 4.0, 1.0])
        cid = f"case_{k:02d}"
        nib.save(nib.Nifti1Image(img.astype(np.float32), affine), root / "imagesTr" / f"{cid}.nii.gz")
        nib.save(nib.Nifti1Image(lab, affine), root / "labelsTr" / f"{cid}.nii.gz")
        training.append({"image": f"./imagesTr/{cid}.nii.gz", "label": f"./labelsTr/{cid}.nii.gz"})
    meta = {"name": "synthetic", "modality": "MR", "labels": {"0": "background", "1": "organ", "2": "lesion"},
            "numTraining": n_patients, "training": training}
    (root / "dataset.json").write_text(json.dumps(meta, indent=1))
    return root
