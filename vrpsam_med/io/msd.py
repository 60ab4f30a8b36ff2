"""Datasets in MSD / nnU-Net layout: ``dataset.json`` (labels, modality, optional split),
``imagesTr/<case>.nii.gz`` and ``labelsTr/<case>.nii.gz``."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vrpsam_med.io.errors import VolumeError
from vrpsam_med.io.volume import Volume


@dataclass(frozen=True)
class Case:
    case_id: str
    image: Path
    label: Path | None  # NIfTI/NRRD/MHA label volume, or a DICOM SEG file on the image series
    series_uid: str | None = None  # the DICOM series to load when ``image`` is a folder of several


@dataclass
class MSDDataset:
    """An MSD/nnU-Net folder. ``labels`` maps label value -> structure name (background excluded)."""

    root: Path
    name: str
    modality: str
    labels: dict[int, str]
    split: dict[str, list[str]] | None
    _cases: list[Case]

    @classmethod
    def open(cls, root: str | Path) -> MSDDataset:
        root = Path(root)
        meta_path = root / "dataset.json" if root.is_dir() else root
        if not meta_path.is_file():
            raise VolumeError(f"{root}: no dataset.json (expected an MSD/nnU-Net dataset folder)")
        root = meta_path.parent
        try:
            meta = json.loads(meta_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise VolumeError(f"{meta_path}: not valid JSON ({exc})") from None
        raw_labels = meta.get("labels")
        if not isinstance(raw_labels, dict) or not raw_labels:
            raise VolumeError(f"{meta_path}: no 'labels' mapping")
        labels: dict[int, str] = {}
        for k, v in raw_labels.items():
            if str(k).lstrip("-").isdigit():  # MSD style {"1": "liver"}
                value, name = int(k), str(v)
            else:  # nnU-Net v2 style {"liver": 1}
                value, name = int(v), str(k)
            if value != 0:
                labels[value] = name
        modality = meta.get("modality", "unknown")
        if isinstance(modality, dict):
            modality = next(iter(modality.values()), "unknown")
        modality = {"CT": "CT", "MR": "MR", "MRI": "MR"}.get(str(modality).upper(), str(modality))
        cases = []
        for item in meta.get("training", []):
            img = (root / item["image"]).resolve()
            lab = (root / item["label"]).resolve() if item.get("label") else None
            cid = img.name.split(".nii")[0]
            cases.append(Case(cid, img, lab))
        if not cases:  # nnU-Net v2 lists no files: scan imagesTr
            for img in sorted((root / "imagesTr").glob("*.nii*")):
                cid = img.name.split(".nii")[0]
                cid = cid[:-5] if cid.endswith("_0000") else cid
                lab = root / "labelsTr" / f"{cid}.nii.gz"
                cases.append(Case(cid, img, lab if lab.exists() else None))
        if not cases:
            raise VolumeError(f"{root}: dataset lists no cases and imagesTr/ is empty")
        split = meta.get("split") if isinstance(meta.get("split"), dict) else None
        return cls(root, str(meta.get("name", root.name)), modality, labels, split, cases)

    def cases(self, split: str | None = None) -> list[Case]:
        """Cases of ``split`` ('train', 'test', ...); all cases when None or when there is no split."""
        if split is None or split == "all" or self.split is None:
            return list(self._cases)
        if split not in self.split:
            raise VolumeError(f"{self.root}: no split {split!r} (has {', '.join(self.split)})")
        wanted = set(self.split[split])
        return [c for c in self._cases if c.case_id in wanted]

    def label_value(self, label: str | int) -> int:
        """Value of a structure given by name or number."""
        if isinstance(label, int) or str(label).isdigit():
            value = int(label)
            if value not in self.labels:
                raise VolumeError(f"{self.root}: label {value} not in dataset labels {sorted(self.labels)}")
            return value
        for value, name in self.labels.items():
            if name == label:
                return value
        raise VolumeError(f"{self.root}: no label named {label!r} (has {', '.join(self.labels.values())})")

    def load(self, case: Case) -> tuple[Volume, np.ndarray | None]:
        """Image volume and its integer label array (same canonical grid), or None without labels."""
        from vrpsam_med.io.readers import load_volume

        image = load_volume(case.image, modality=self.modality, series_uid=case.series_uid)
        if case.label is None:
            return image, None
        from vrpsam_med.io.dicom_seg import is_dicom_seg, read_dicom_seg

        if is_dicom_seg(case.label):  # segments matched to the dataset's structures by name
            return image, read_dicom_seg(case.label, image, {n: v for v, n in self.labels.items()})
        lab = load_volume(case.label)
        if lab.shape != image.shape or not np.allclose(lab.affine, image.affine, atol=1e-3):
            raise VolumeError(f"{case.label}: label grid {lab.shape} does not match its image {image.shape}")
        return image, np.rint(lab.array).astype(np.int16)
