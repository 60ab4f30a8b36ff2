"""Fine-tuning inputs -> one :class:`MSDDataset`, checked, and split by patient.

Accepted ``DIR``: an MSD/nnU-Net folder (``dataset.json`` + imagesTr/labelsTr), a CSV file with
``image,label`` columns (header required; relative paths are relative to the CSV's folder; an
optional ``case_id`` column names the cases; a label may be a DICOM SEG), or a folder of DICOM
series with DICOM SEG files (each SEG is one case on the series it references; segments are matched
to structures by their segment label; one patient = one PatientID).
"""
from __future__ import annotations

import csv
import logging
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from vrpsam_med.errors import UsageError
from vrpsam_med.evaluation.protocols import patient_id
from vrpsam_med.io.msd import Case, MSDDataset

log = logging.getLogger(__name__)


def open_source(path: str | Path, label_names: dict | None = None, modality: str = "unknown") -> MSDDataset:
    """MSD folder or CSV -> dataset. ``label_names`` ({value: name}) and ``modality`` are for CSV input."""
    path = Path(path)
    if path.is_dir() and (path / "dataset.json").is_file():
        return MSDDataset.open(path)
    if path.is_file() and path.suffix.lower() == ".csv":
        return _from_csv(path, label_names, modality)
    if path.is_dir():
        series = _dicom_series(path)
        if series:
            return _from_dicom(path, series)
        raise UsageError(f"{path}: no dataset.json here (expected an MSD/nnU-Net folder, a CSV of image,label, "
                         "or a folder of DICOM series with DICOM SEG files)")
    raise UsageError(f"{path}: not found, or not an MSD folder / .csv file / DICOM folder")


def _dicom_series(path: Path) -> list:
    """DICOM series in ``path``, its patient subfolders, and one level below those (``<patient>/<series>/``)."""
    from vrpsam_med.io.dicom import scan_folder
    from vrpsam_med.io.errors import VolumeError

    found: dict[str, object] = {}
    for folder in [path, *sorted(d for d in path.iterdir() if d.is_dir() and not d.name.startswith("."))]:
        try:
            series, _ = scan_folder(folder)
        except VolumeError:  # no DICOM files there
            continue
        for s in series:
            if s.uid not in found or s.n_files > found[s.uid].n_files:
                found[s.uid] = s
    return list(found.values())


def _from_dicom(path: Path, series: list) -> MSDDataset:
    """A folder of DICOM image series + DICOM SEG files -> one case per SEG (``<PatientID>_tp<n>``)."""
    from vrpsam_med.io.dicom_seg import read_seg_header

    images = {s.uid: s for s in series if s.is_image}
    seg_files = [f for s in series if not s.is_image and s.modality.upper() == "SEG" for f in s.files]
    if not seg_files:
        raise UsageError(f"{path}: DICOM series but no DICOM SEG files: nothing to train on (labels are needed)")
    headers = [read_seg_header(f) for f in sorted(seg_files)]
    names = sorted({n for h in headers for n in h.segments.values()})
    cases, seen = [], {}
    for h in headers:
        img = images.get(h.series_uid)
        if img is None:
            raise UsageError(f"{h.path}: its image series {h.series_uid} is not in {path}")
        pid = "".join(c if c.isalnum() or c in "-." else "_" for c in (h.patient_id or img.uid))
        seen[pid] = seen.get(pid, 0) + 1
        folder = img.folder or img.files[0].parent
        cases.append(Case(f"{pid}_tp{seen[pid]}", folder, h.path, series_uid=img.uid))
    modalities = {images[h.series_uid].modality.upper() for h in headers}
    modality = modalities.pop() if len(modalities) == 1 else "unknown"
    return MSDDataset(path, path.name, {"MR": "MR", "CT": "CT"}.get(modality, "unknown"),
                      {i + 1: n for i, n in enumerate(names)}, None, cases)


def _from_csv(path: Path, label_names: dict | None, modality: str) -> MSDDataset:
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or not {"image", "label"} <= set(rows[0]):
        raise UsageError(f"{path}: expected a header with 'image' and 'label' columns and at least one row")
    cases = []
    for i, row in enumerate(rows, start=2):
        img, lab = (row.get("image") or "").strip(), (row.get("label") or "").strip()
        if not img or not lab:
            raise UsageError(f"{path}, line {i}: image and label paths are both required")
        img_p, lab_p = (path.parent / img).resolve(), (path.parent / lab).resolve()
        cid = (row.get("case_id") or "").strip() or img_p.name.split(".")[0]
        cases.append(Case(cid, img_p, lab_p))
    ids = [c.case_id for c in cases]
    if len(set(ids)) != len(ids):
        raise UsageError(f"{path}: case ids are not unique (add a case_id column)")
    names = {int(k): str(v) for k, v in (label_names or {}).items() if int(k) != 0}
    if not names:  # name them by value; the values are read from the label files
        values: set[int] = set()
        for c in cases:
            values |= set(_label_values(c))
        names = {v: f"label_{v}" for v in sorted(values) if v != 0}
    return MSDDataset(path.parent, path.stem, modality, names, None, cases)


def _label_values(case: Case) -> list[int]:
    from vrpsam_med.io.readers import load_volume

    if not case.label.exists():
        raise UsageError(f"{case.label}: label file not found (case {case.case_id})")
    return [int(v) for v in np.unique(np.rint(load_volume(case.label).array).astype(np.int64))]


@dataclass
class CheckedCase:
    case: Case
    patient: str
    labels: set[int]  # label values present in the case


def check_cases(ds: MSDDataset, cases: list[Case]) -> list[CheckedCase]:
    """Every case needs a label file on its image's grid, not empty. Errors name the file."""
    out = []
    for case in cases:
        if case.label is None:
            raise UsageError(f"{case.image}: no label file for case {case.case_id}")
        if not case.label.exists():
            raise UsageError(f"{case.label}: label file not found (case {case.case_id})")
        if not case.image.exists():
            raise UsageError(f"{case.image}: image file not found (case {case.case_id})")
        _, lab = ds.load(case)  # raises VolumeError naming the label when shape/geometry differ
        present = {int(v) for v in np.unique(lab)} - {0}
        if not present:
            raise UsageError(f"{case.label}: label volume is empty (case {case.case_id}); remove the case or fix it")
        unknown = present - set(ds.labels)
        if unknown:
            log.warning("%s: label values %s are not in the dataset's labels; ignored", case.label, sorted(unknown))
        out.append(CheckedCase(case, patient_id(case.case_id), present & set(ds.labels)))
    return out


def split_by_patient(checked: list[CheckedCase], val_fraction: float, min_val: int, seed: int
                     ) -> tuple[list[CheckedCase], list[CheckedCase]]:
    """(train, val): whole patients on one side only; ``max(min_val, round(fraction * patients))`` for val."""
    patients = sorted({c.patient for c in checked})
    n_val = max(min_val, int(round(val_fraction * len(patients))))
    if len(patients) - n_val < 1:
        raise UsageError(f"{len(patients)} patient(s) with labels: need at least {min_val + 1} "
                         f"({min_val} to validate, 1 or more to train)")
    order = np.random.default_rng(seed).permutation(len(patients))
    val_p = {patients[i] for i in order[:n_val]}
    return [c for c in checked if c.patient not in val_p], [c for c in checked if c.patient in val_p]


def check_label_counts(ds: MSDDataset, train: list[CheckedCase], val: list[CheckedCase], names: list[str],
                       min_train: int = 1, min_val: int = 2) -> None:
    """Every structure needs ``min_train`` labelled train patients and ``min_val`` val patients."""
    for name in names:
        value = ds.label_value(name)
        n_tr = len({c.patient for c in train if value in c.labels})
        n_va = len({c.patient for c in val if value in c.labels})
        if n_tr < min_train or n_va < min_val:
            raise UsageError(
                f"structure {name!r} is labelled in too few patients: {n_tr} train, {n_va} validation "
                f"(need >= {min_train} and >= {min_val}); label more patients, or leave it out with --labels")


def with_split(ds: MSDDataset, train: list[CheckedCase], val: list[CheckedCase]) -> MSDDataset:
    """The dataset with a ``{'train': ..., 'val': ...}`` split (what the evaluate harness reads)."""
    return replace(ds, split={"train": [c.case.case_id for c in train], "val": [c.case.case_id for c in val]})
