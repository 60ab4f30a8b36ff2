"""Read DICOM SEG label objects (highdicom) onto the canonical grid of the series they reference.

A SEG's segments are matched to structures *by name* (the segment label), so two SEG files that
number their segments differently still give one label value per structure; without a name table
the segment numbers are the label values.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vrpsam_med.io.errors import VolumeError
from vrpsam_med.io.volume import Volume


@dataclass(frozen=True)
class SegHeader:
    """What a DICOM SEG says about itself, without decoding its frames."""

    path: Path
    series_uid: str  # the image series it references
    patient_id: str
    segments: dict[int, str]  # segment number -> segment label


def is_dicom_seg(path: str | Path) -> bool:
    """True for a DICOM file whose Modality is SEG (reads the header only)."""
    import pydicom

    path = Path(path)
    if not path.is_file():
        return False
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["Modality"])
    except Exception:
        return False
    return str(ds.get("Modality", "")).upper() == "SEG"


def read_seg_header(path: str | Path) -> SegHeader:
    """Referenced series, patient and segment labels of a SEG; VolumeError naming the file otherwise."""
    import pydicom

    path = Path(path)
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
    except Exception as exc:
        raise VolumeError(f"{path}: not a readable DICOM file ({exc})") from None
    if str(ds.get("Modality", "")).upper() != "SEG":
        raise VolumeError(f"{path}: not a DICOM SEG (Modality {ds.get('Modality', 'missing')})")
    refs = ds.get("ReferencedSeriesSequence") or []
    if not refs or not str(refs[0].get("SeriesInstanceUID", "")).strip():
        raise VolumeError(f"{path}: the DICOM SEG references no image series (ReferencedSeriesSequence)")
    segments = {int(s.SegmentNumber): str(s.get("SegmentLabel", "") or f"segment_{int(s.SegmentNumber)}")
                for s in ds.get("SegmentSequence") or []}
    if not segments:
        raise VolumeError(f"{path}: the DICOM SEG has no segments")
    return SegHeader(path, str(refs[0].SeriesInstanceUID), str(ds.get("PatientID", "") or ""), segments)


def read_dicom_seg(path: str | Path, like: Volume, values: Mapping[str, int] | None = None) -> np.ndarray:
    """The SEG's segments as one canonical int16 label array on ``like``'s grid.

    ``like`` must be the DICOM series the SEG references. ``values`` maps segment labels to label
    values (default: segment numbers); segments not in ``values`` are ignored; where segments
    overlap, the later segment wins.
    """
    import highdicom as hd

    from vrpsam_med.io.writers import from_source_grid, ordered_source_datasets

    path = Path(path)
    header = read_seg_header(path)
    if (like.meta or {}).get("source_format") != "dicom":
        raise VolumeError(f"{path}: a DICOM SEG needs its DICOM image series; {like.source} is not one")
    if header.series_uid != like.series_uid:
        raise VolumeError(f"{path}: the SEG references series {header.series_uid}, not {like.series_uid} "
                          f"({like.source})")
    try:
        seg = hd.seg.segread(path)
    except Exception as exc:
        raise VolumeError(f"{path}: cannot read the DICOM SEG ({exc})") from None
    if str(seg.SegmentationType) == "LABELMAP":
        raise VolumeError(f"{path}: LABELMAP DICOM SEGs are not supported yet; use a BINARY or FRACTIONAL SEG")
    sources = ordered_source_datasets(like, path, len(like.meta.get("dicom_files") or []))
    uids = [str(ds.SOPInstanceUID) for ds in sources]
    numbers = sorted(header.segments)
    try:
        pixels = seg.get_pixels_by_source_instance(uids, segment_numbers=numbers, combine_segments=False,
                                                   assert_missing_frames_are_empty=True)
    except (ValueError, KeyError, RuntimeError) as exc:
        raise VolumeError(f"{path}: its frames do not match the series {like.series_uid} ({exc})") from None
    labels = np.zeros(pixels.shape[:3], np.int16)  # (frames, rows, cols)
    for i, number in enumerate(numbers):
        name = header.segments[number]
        value = number if values is None else values.get(name)
        if value is not None:
            labels[pixels[..., i] > 0] = value
    return from_source_grid(np.transpose(labels, (2, 1, 0)), like).astype(np.int16)  # (x, y, slice) -> canonical
