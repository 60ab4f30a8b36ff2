"""Write label masks back onto the SOURCE voxel grid: NIfTI (any source) or DICOM SEG (DICOM sources).

Masks are given in the canonical LPS order of :class:`~vrpsam_med.io.volume.Volume` (same
shape as ``volume.array``, integer labels, 0 = background). Writers undo the loader's axis
permutation/flips with nibabel's orientation tools, so that

- a NIfTI mask reopens in nibabel and SimpleITK with exactly the geometry of its source:
  for a NIfTI source its qform/sform (and codes) are copied; for any other source (DICOM,
  NRRD, MetaImage) the source affine as SimpleITK reads it is written as both qform and sform,
  i.e. the geometry of the NIfTI SimpleITK itself would write for that image;
- a DICOM SEG (highdicom, BINARY, one segment per label) references the source instances
  frame by frame.

Both writers are atomic (:func:`~vrpsam_med.io.atomic.atomic_write`), refuse to overwrite
unless asked, and never write onto an input file.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from vrpsam_med.io.atomic import atomic_write, check_output
from vrpsam_med.io.errors import VolumeError
from vrpsam_med.io.volume import Volume

GENERATOR = "vrpsam-med"
NIFTI_LABEL_INTENT = "label"
NIFTI_COMMENT_CODE = 6  # NIFTI_ECODE_COMMENT: the label table as JSON


def _version() -> str:
    try:
        from vrpsam_med import __version__

        return str(__version__)
    except Exception:  # pragma: no cover
        return "0"


def input_paths(like: Volume) -> list[Path]:
    """Paths a writer must never write onto: the source and, for DICOM, every source file."""
    paths = [Path(like.source)] if like.source is not None else []
    paths += [Path(f) for f in (like.meta or {}).get("dicom_files", [])]
    return paths


def check_mask(mask: np.ndarray, like: Volume, where: str | os.PathLike) -> np.ndarray:
    """Validate a canonical label mask against ``like``; returns it as uint8 or uint16."""
    m = np.asarray(mask)
    if m.shape != tuple(like.shape):
        raise VolumeError(f"{where}: mask shape {m.shape} does not match the volume shape {tuple(like.shape)}")
    if m.dtype == bool:
        return m.astype(np.uint8)
    if np.issubdtype(m.dtype, np.floating):
        if not np.all(np.isfinite(m)):
            raise VolumeError(f"{where}: mask has NaN/Inf values; labels must be integers")
        r = np.rint(m)
        if not np.array_equal(r, m):
            raise VolumeError(f"{where}: mask has non-integer values; labels must be integers")
        m = r.astype(np.int64)
    elif not np.issubdtype(m.dtype, np.integer):
        raise VolumeError(f"{where}: mask dtype {m.dtype} is not an integer label type")
    if m.size and int(m.min()) < 0:
        raise VolumeError(f"{where}: mask has negative labels (min {int(m.min())})")
    top = int(m.max()) if m.size else 0
    if top > 65535:
        raise VolumeError(f"{where}: label {top} does not fit in uint16")
    return m.astype(np.uint8 if top <= 255 else np.uint16, copy=False)


def to_source_grid(array: np.ndarray, like: Volume) -> np.ndarray:
    """Canonical (LPS) array -> the file's own voxel order (``like.source_affine``), exact inverse."""
    src_aff = like.source_affine if like.source_affine is not None else like.affine
    canon = nib.io_orientation(like.affine)
    src = nib.io_orientation(src_aff)
    t = nib.orientations.ornt_transform(canon, src)
    out = nib.orientations.apply_orientation(array, t)
    # the reoriented grid must map to the same world points as the source grid
    back = like.affine @ nib.orientations.inv_ornt_aff(t, array.shape)
    tol = 1e-3 * max(1.0, float(np.abs(src_aff).max()))
    if not np.allclose(back, src_aff, atol=tol):
        raise VolumeError(f"{like.source or 'volume'}: canonical and source geometry disagree; "
                          "cannot restore the source voxel grid")
    return np.ascontiguousarray(out)


def from_source_grid(array: np.ndarray, like: Volume) -> np.ndarray:
    """The file's own voxel order (``like.source_affine``) -> canonical (LPS) array: inverse of to_source_grid."""
    src_aff = like.source_affine if like.source_affine is not None else like.affine
    t = nib.orientations.ornt_transform(nib.io_orientation(src_aff), nib.io_orientation(like.affine))
    return nib.orientations.apply_orientation(array, t)


def _label_table(label_names: Mapping[int, str] | None, present: Iterable[int]) -> dict[int, str]:
    names = {int(k): str(v) for k, v in (label_names or {}).items() if int(k) != 0}
    for v in present:
        names.setdefault(int(v), f"label {int(v)}")
    return dict(sorted(names.items()))


def write_mask_nifti(mask: np.ndarray, like: Volume, out: str | os.PathLike, overwrite: bool = False,
                     label_names: Mapping[int, str] | None = None, *,
                     protect: Iterable[str | os.PathLike] = ()) -> Path:
    """Write a canonical label ``mask`` as NIfTI (uint8/uint16) on ``like``'s SOURCE voxel grid.

    ``out`` must end in ``.nii`` or ``.nii.gz``. ``label_names`` ({value: name}) is stored as a
    JSON NIfTI comment extension (``{"generator": ..., "labels": {...}}``) and the intent is set
    to "label". Atomic; refuses to overwrite unless ``overwrite``; never writes onto an input.
    """
    out = Path(out).expanduser()
    if not out.name.lower().endswith((".nii", ".nii.gz")):
        raise VolumeError(f"{out}: a NIfTI mask needs a .nii or .nii.gz file name")
    guard = [*input_paths(like), *protect]
    check_output(out, overwrite, guard)
    labels = check_mask(mask, like, out)
    data = to_source_grid(labels, like)
    img = _nifti_like_source(data, like)
    present = [int(v) for v in np.unique(labels) if v != 0]
    table = _label_table(label_names, present)
    payload = json.dumps({"generator": f"{GENERATOR} {_version()}", "labels": {str(k): v for k, v in table.items()}})
    img.header.extensions.append(nib.nifti1.Nifti1Extension(NIFTI_COMMENT_CODE, payload.encode("utf-8")))
    img.header.set_intent(NIFTI_LABEL_INTENT)
    img.header["descrip"] = f"{GENERATOR} label mask".encode()[:79]
    with atomic_write(out, overwrite=overwrite, protect=guard) as tmp:
        nib.save(img, str(tmp))
    return out


def _nifti_like_source(data: np.ndarray, like: Volume) -> nib.Nifti1Image:
    """NIfTI image of ``data`` (source voxel order) whose geometry matches the source file."""
    src_aff = np.asarray(like.source_affine if like.source_affine is not None else like.affine, dtype=np.float64)
    src = Path(like.source) if like.source is not None else None
    if src is not None and src.is_file() and src.name.lower().endswith((".nii", ".nii.gz")):
        try:
            ref = nib.load(str(src))
        except Exception:
            ref = None
        if ref is not None and tuple(ref.shape[:3]) == data.shape:
            # copy the source's own qform/sform (and their codes): the mask then behaves like
            # its source in every reader, whatever that reader prefers
            hdr = ref.header.copy()
            img = nib.Nifti1Image(data, None, header=hdr)
            img.set_qform(*ref.header.get_qform(coded=True))
            img.set_sform(*ref.header.get_sform(coded=True))
            img.header.set_data_dtype(data.dtype)
            img.header["scl_slope"] = np.nan
            img.header["scl_inter"] = np.nan
            img.header["cal_min"] = 0
            img.header["cal_max"] = 0
            img.header.extensions.clear()
            return img
    img = nib.Nifti1Image(data, src_aff)
    img.set_qform(src_aff, code=1)  # scanner coordinates, as SimpleITK writes
    img.set_sform(src_aff, code=1)
    img.header.set_xyzt_units("mm")
    img.header.set_data_dtype(data.dtype)
    return img


# ----------------------------------------------------------------------------- DICOM SEG

def _uid_or(ds, keyword: str, fallback: str) -> str:
    v = str(ds.get(keyword, "") or "").strip()
    return v or fallback


def _source_datasets(like: Volume, out: Path) -> list:
    """Source headers with UIDs a SEG can reference (blanked UIDs filled as the loader derived them)."""
    import pydicom

    from vrpsam_med.io.dicom import derived_uid

    files = (like.meta or {}).get("dicom_files") or []
    datasets = []
    for f in files:
        try:
            ds = pydicom.dcmread(f, stop_before_pixels=True)
        except FileNotFoundError:
            raise VolumeError(f"{out}: source DICOM file {f} is gone; reload the series") from None
        except Exception as exc:
            raise VolumeError(f"{f}: cannot read the source DICOM file ({exc})") from None
        meta = getattr(ds, "file_meta", None)
        sop_class = _uid_or(ds, "SOPClassUID", str(meta.get("MediaStorageSOPClassUID", "")) if meta else "")
        sop_inst = _uid_or(ds, "SOPInstanceUID", str(meta.get("MediaStorageSOPInstanceUID", "")) if meta else "")
        if not sop_class:
            raise VolumeError(f"{f}: no SOP Class UID; cannot reference it from a DICOM SEG")
        ds.SOPClassUID = sop_class
        ds.SOPInstanceUID = sop_inst or derived_uid("instance", like.series_uid, f)
        if not str(ds.get("SeriesInstanceUID", "") or "").strip():
            ds.SeriesInstanceUID = like.series_uid
        if not str(ds.get("StudyInstanceUID", "") or "").strip():
            ds.StudyInstanceUID = derived_uid("study", like.series_uid, ds.get("StudyDate", ""),
                                              ds.get("FrameOfReferenceUID", ""))
        datasets.append(ds)
    return datasets


def ordered_source_datasets(like: Volume, out: Path, n_slices: int) -> list:
    """The source series' headers in the order of its own voxel grid's slices (what a SEG's frames reference)."""
    datasets = _source_datasets(like, out)
    if len(datasets) != n_slices:
        raise VolumeError(f"{out}: {len(datasets)} source files for {n_slices} slices; reload the series")
    src_aff = np.asarray(like.source_affine, dtype=np.float64)
    inv = np.linalg.inv(src_aff)
    order: list[tuple[int, Any]] = []
    for ds in datasets:
        ipp = np.asarray([float(v) for v in ds.ImagePositionPatient], dtype=np.float64)
        ijk = inv @ np.array([-ipp[0], -ipp[1], ipp[2], 1.0])  # LPS -> RAS, then world -> source voxel
        k = int(round(ijk[2]))
        if not (abs(ijk[0]) < 0.01 and abs(ijk[1]) < 0.01 and abs(ijk[2] - k) < 0.01 and 0 <= k < n_slices):
            raise VolumeError(f"{out}: source slice position {ipp.tolist()} is not on the volume grid; "
                              "reload the series")
        order.append((k, ds))
    order.sort(key=lambda t: t[0])
    if [k for k, _ in order] != list(range(n_slices)):
        raise VolumeError(f"{out}: source files do not cover every slice once; reload the series")
    return [ds for _, ds in order]


def write_dicom_seg(mask: np.ndarray, like: Volume, out: str | os.PathLike,
                    label_names: Mapping[int, str] | None = None, overwrite: bool = False, *,
                    protect: Iterable[str | os.PathLike] = (), omit_empty_frames: bool = True) -> Path:
    """Write a canonical label ``mask`` as a DICOM SEG (highdicom, BINARY) for a DICOM-sourced ``like``.

    One segment per label value in ``label_names`` (plus any unnamed value present in the mask),
    numbered 1..N in increasing label value; the segment label is the name and the tracking ID
    records the original value. Algorithm identification "vrpsam-med". Frames reference the
    source instances (``like.meta["dicom_files"]``); empty frames are omitted by default.
    When the source files carry no Study/Series/SOP Instance UIDs (anonymised), the SEG
    references the UIDs the loader derived (``like.series_uid``).
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes

    out = Path(out).expanduser()
    meta = like.meta or {}
    if meta.get("source_format") != "dicom" or not meta.get("dicom_files"):
        fmt = meta.get("source_format", "not DICOM")
        raise VolumeError(f"{out}: a DICOM SEG needs a volume loaded from a DICOM series "
                          f"({like.source or 'this volume'} is {fmt}); write a NIfTI mask (.nii.gz) instead")
    if meta.get("multiframe"):
        raise VolumeError(f"{out}: DICOM SEG for a multi-frame source image is not supported; write NIfTI instead")
    guard = [*input_paths(like), *protect]
    check_output(out, overwrite, guard)
    labels = check_mask(mask, like, out)
    present = [int(v) for v in np.unique(labels) if v != 0]
    table = _label_table(label_names, present)
    if not table:
        raise VolumeError(f"{out}: nothing to write (empty mask and no label names)")
    values = np.array(sorted(table), dtype=np.int64)
    lut = np.zeros(int(max(values.max(), labels.max() if labels.size else 0)) + 1, dtype=np.uint16)
    lut[values] = np.arange(1, len(values) + 1, dtype=np.uint16)
    seg_numbers = lut[labels]

    src = to_source_grid(seg_numbers, like)  # (x, y, slice) in the series' own order
    source_images = ordered_source_datasets(like, out, src.shape[2])
    rows, cols = int(source_images[0].Rows), int(source_images[0].Columns)
    if (src.shape[1], src.shape[0]) != (rows, cols):
        raise VolumeError(f"{out}: mask slices are {src.shape[1]}x{src.shape[0]}, source images {rows}x{cols}")
    pixels = np.ascontiguousarray(np.transpose(src, (2, 1, 0)))  # (frames, rows, cols)

    algo = hd.AlgorithmIdentificationSequence(name=GENERATOR, family=codes.cid7162.ArtificialIntelligence,
                                              version=_version())
    descriptions = []
    for number, value in enumerate(values.tolist(), start=1):
        name = table[value]
        descriptions.append(hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=name[:64],
            segmented_property_category=codes.SCT.AnatomicalStructure,
            segmented_property_type=codes.SCT.AnatomicalStructure,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algo,
            tracking_uid=hd.UID(),
            tracking_id=f"{GENERATOR} label {value}"[:64],
        ))
    try:
        series_number = int(source_images[0].get("SeriesNumber") or 0) + 1000
    except (TypeError, ValueError):
        series_number = 1000
    try:
        seg = hd.seg.Segmentation(
            source_images=source_images,
            pixel_array=pixels,
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=descriptions,
            series_instance_uid=hd.UID(),
            series_number=series_number,
            sop_instance_uid=hd.UID(),
            instance_number=1,
            manufacturer=GENERATOR,
            manufacturer_model_name=GENERATOR,
            software_versions=_version(),
            device_serial_number="0",
            content_label="VRPSAMMED",
            content_description=f"{GENERATOR} segmentation",
            series_description=f"{GENERATOR} segmentation",
            omit_empty_frames=omit_empty_frames,
        )
    except (ValueError, TypeError, AttributeError) as exc:
        raise VolumeError(f"{out}: cannot build the DICOM SEG ({exc})") from None
    with atomic_write(out, overwrite=overwrite, protect=guard) as tmp:
        seg.save_as(str(tmp))
    return out
