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


def write_synthetic_dicom(root: str | Path, n_patients: int = 4, shape: tuple[int, int, int] = (48, 48, 4),
                          seed: int = 0) -> Path:
    """The synthetic cases as a hospital-style folder: ``root/<patient>/image/`` (an MR DICOM series,
    one file per slice) and ``root/<patient>/<patient>_seg.dcm`` (a DICOM SEG of "organ" and "lesion")."""
    import tempfile

    import SimpleITK as sitk

    from vrpsam_med.io.dicom import derived_uid
    from vrpsam_med.io.readers import load_volume
    from vrpsam_med.io.writers import write_dicom_seg

    root = Path(root)
    with tempfile.TemporaryDirectory() as tmp:
        msd = write_synthetic_msd(Path(tmp) / "msd", n_patients, shape, seed)
        for k in range(n_patients):
            pid = f"SYN{k:03d}"
            img = sitk.ReadImage(str(msd / "imagesTr" / f"case_{k:02d}.nii.gz"))
            img = sitk.Cast(sitk.RescaleIntensity(img, 0, 4000), sitk.sitkInt16)
            series_dir = root / pid / "image"
            series_dir.mkdir(parents=True, exist_ok=True)
            study, series = derived_uid("study", pid), derived_uid("series", pid)
            direction = img.GetDirection()
            iop = "\\".join(f"{v:.6f}" for v in (direction[0], direction[3], direction[6],
                                                   direction[1], direction[4], direction[7]))
            for z in range(img.GetDepth()):
                sl = img[:, :, z]
                tags = {"0008|0060": "MR", "0008|0016": "1.2.840.10008.5.1.4.1.1.4",
                        "0008|0018": derived_uid("instance", pid, z), "0010|0010": f"Synthetic^{pid}", "0010|0020": pid,
                        "0020|000d": study, "0020|000e": series, "0020|0011": "1", "0020|0013": str(z + 1),
                        "0020|0052": derived_uid("frame", pid), "0020|0037": iop,
                        "0020|0032": "\\".join(f"{v:.4f}" for v in img.TransformIndexToPhysicalPoint((0, 0, z))),
                        "0018|0050": f"{img.GetSpacing()[2]:.4f}", "0008|103e": "synthetic T2"}
                for key, value in tags.items():
                    sl.SetMetaData(key, value)
                writer = sitk.ImageFileWriter()
                writer.KeepOriginalImageUIDOn()
                writer.SetFileName(str(series_dir / f"{z + 1:04d}.dcm"))
                writer.Execute(sl)
            vol = load_volume(series_dir)
            lab = load_volume(msd / "labelsTr" / f"case_{k:02d}.nii.gz")
            write_dicom_seg(np.rint(lab.array).astype(np.int16), vol, root / pid / f"{pid}_seg.dcm",
                            {1: "organ", 2: "lesion"})
    return root
